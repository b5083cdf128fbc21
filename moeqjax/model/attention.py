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
  def __call__(self, x_BxSxD, positions_BxS, decode: bool = False):
    """Self-attention over x; with `decode`, over the `cache` collection's keys and values too.

    In decode mode this call's keys and values are written into the cache at its index, and the
    queries attend to every cached position up to their own. A decode-mode `init` creates a cache
    as long as the init input (see moeqjax.serve.init_cache).
    """
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
    mask_SxK = None
    if decode:
      k, v, mask_SxK = self._cached(k, v)
    out = causal_gqa(q, k, v, mask_SxK)
    out = out.reshape(b, s, h * a)
    return proj("o_proj", cfg.d_model, ("heads", "embed"), cfg.attn_out_bias)(out)

  def _cached(self, k_BxSxGxA, v_BxSxGxA):
    """Writes this call's keys/values at the cache index; returns the whole cache and its mask."""
    initialized = self.has_variable("cache", "cached_key")
    index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    k, v = write_kv_cache(self, k_BxSxGxA, v_BxSxGxA, index.value)
    if not initialized:  # init only sizes the cache
      return k, v, None
    start, s = index.value, k_BxSxGxA.shape[1]
    index.value = start + s
    # Slot j holds position j: a query at start + i sees the slots up to its own position.
    mask_SxK = jnp.arange(k.shape[1])[None, :] <= (start + jnp.arange(s))[:, None]
    return k, v, mask_SxK


def write_kv_cache(module: nn.Module, k_BxSxGxA, v_BxSxGxA, start):
  """Writes keys/values at slot `start` of `module`'s `cache` collection; returns the whole cache.

  The first call (a decode-mode init) only creates the cache, as long as its input, and returns
  the keys and values as they are.
  """
  initialized = module.has_variable("cache", "cached_key")
  cached_k = module.variable("cache", "cached_key", jnp.zeros, k_BxSxGxA.shape, k_BxSxGxA.dtype)
  cached_v = module.variable("cache", "cached_value", jnp.zeros, v_BxSxGxA.shape,
                             v_BxSxGxA.dtype)
  if not initialized:
    return k_BxSxGxA, v_BxSxGxA
  cached_k.value = jax.lax.dynamic_update_slice(
      cached_k.value, k_BxSxGxA.astype(cached_k.value.dtype), (0, start, 0, 0))
  cached_v.value = jax.lax.dynamic_update_slice(
      cached_v.value, v_BxSxGxA.astype(cached_v.value.dtype), (0, start, 0, 0))
  return cached_k.value, cached_v.value


def causal_gqa(q_BxSxHxA, k_BxKxGxA, v_BxKxGxA, mask_SxK=None):
  """Softmax attention; query heads are grouped over kv heads.

  Written with einsums rather than jax.nn.dot_product_attention so that the math is the
  same on every backend (the HF parity tests compare at 1e-4).

  Args:
    q_BxSxHxA, k_BxKxGxA, v_BxKxGxA: queries, keys and values (K key positions).
    mask_SxK: which keys each query sees; None is the causal mask of a full sequence (K == S).
  """
  b, s, h, a = q_BxSxHxA.shape
  g = k_BxKxGxA.shape[2]
  q = q_BxSxHxA.reshape(b, s, g, h // g, a).astype(jnp.float32)
  scores = jnp.einsum("bqgra,bkga->bgrqk", q, k_BxKxGxA.astype(jnp.float32)) / jnp.sqrt(a)
  mask = jnp.tril(jnp.ones((s, s), dtype=bool)) if mask_SxK is None else mask_SxK
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bgrqk,bkga->bqgra", probs, v_BxKxGxA.astype(jnp.float32))
  return out.reshape(b, s, h, a).astype(q_BxSxHxA.dtype)
