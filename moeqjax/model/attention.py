"""Causal grouped-query self-attention with rotary embeddings and optional q/k norms."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moeqjax.model.config import ModelConfig
from moeqjax.model.layers import QDense, RMSNorm, apply_rope, rope_tables


class Attention(nn.Module):
  """Multi-head attention: H query heads share G key/value heads (H % G == 0)."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxD, positions_BxS):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, s, _ = x_BxSxD.shape
    h, g, a = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def proj(name, feats, axes, bias):
      return QDense(feats, axes, cfg.quant, cfg.quant.attn_code, use_bias=bias, dtype=dtype,
                    param_dtype=pdtype, name=name)

    q = proj("q_proj", h * a, ("embed", "heads"), cfg.attn_bias)(x_BxSxD)
    k = proj("k_proj", g * a, ("embed", "kv"), cfg.attn_bias)(x_BxSxD)
    v = proj("v_proj", g * a, ("embed", "kv"), cfg.attn_bias)(x_BxSxD)
    if cfg.qk_norm == "full":  # OLMoE: one norm over all heads' dims
      q = RMSNorm(cfg.norm_eps, "heads", dtype, pdtype, name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, "kv", dtype, pdtype, name="k_norm")(k)
    if cfg.clip_qkv > 0:  # after the full q/k norm, as OLMoE does
      q, k, v = (jnp.clip(t, -cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q = q.reshape(b, s, h, a)
    k = k.reshape(b, s, g, a)
    v = v.reshape(b, s, g, a)
    if cfg.qk_norm == "head":  # Qwen3: a norm per head over head_dim
      q = RMSNorm(cfg.norm_eps, "head_dim", dtype, pdtype, name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, "head_dim", dtype, pdtype, name="k_norm")(k)
    cos, sin = rope_tables(positions_BxS, a, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = causal_gqa(q, k, v)
    out = out.reshape(b, s, h * a)
    return proj("o_proj", cfg.d_model, ("heads", "embed"), cfg.attn_out_bias)(out)


def causal_gqa(q_BxSxHxA, k_BxSxGxA, v_BxSxGxA):
  """Softmax attention with a causal mask; query heads are grouped over kv heads.

  Written with einsums rather than jax.nn.dot_product_attention so that the math is the
  same on every backend (the HF parity tests compare at 1e-4).
  """
  b, s, h, a = q_BxSxHxA.shape
  g = k_BxSxGxA.shape[2]
  q = q_BxSxHxA.reshape(b, s, g, h // g, a).astype(jnp.float32)
  scores = jnp.einsum("bqgra,bkga->bgrqk", q, k_BxSxGxA.astype(jnp.float32)) / jnp.sqrt(a)
  mask = jnp.tril(jnp.ones((s, s), dtype=bool))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrqk,bkga->bqgra", probs, v_BxSxGxA.astype(jnp.float32))
  return out.reshape(b, s, h, a).astype(q_BxSxHxA.dtype)
