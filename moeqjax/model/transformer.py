"""The decoder-only MoE language model."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moeqjax.model.attention import Attention
from moeqjax.model.config import ModelConfig
from moeqjax.model.layers import QDense, RMSNorm
from moeqjax.model.moe import MoE

# Routing tensors every forward pass sows into the `intermediates` collection, stacked over layers.
AUX_KEYS = ("router_logits", "expert_idx", "gates", "lb_loss", "z_loss", "moe_out", "drop_rate")


class Block(nn.Module):
  """Pre-norm residual block: attention then MoE FFN."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxD, positions_BxS, decode: bool = False):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="attn_norm")(x_BxSxD)
    x_BxSxD = x_BxSxD + Attention(cfg, name="attn")(h, positions_BxS, decode)
    h = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="mlp_norm")(x_BxSxD)
    y, aux = MoE(cfg, name="moe")(h)
    return x_BxSxD + y, aux


class MoETransformer(nn.Module):
  """tokens [B, S] -> logits [B, S, V] (float32).

  Apply with `{"params": p}` for full precision, or `{"params": p, "quant": codes}` for the
  fake-quantized student. Pass `mutable=["intermediates"]` to also get the per-layer routing
  tensors (see AUX_KEYS), each stacked over layers as [L, ...]. With a `packed` collection
  (moeqjax.serve.load_packed) the quantized weights come packed and are dequantized inside
  the computation. `decode=True` reads and extends the `cache` collection (a KV cache; pass
  `mutable=["cache"]` and the positions of the tokens).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxS, positions_BxS=None, decode: bool = False):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions_BxS is None:
      if decode and not self.is_initializing():
        raise ValueError("decode=True needs the positions of the tokens (positions_BxS)")
      positions_BxS = jnp.broadcast_to(jnp.arange(tokens_BxS.shape[1]), tokens_BxS.shape)
    embedding_VxD = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), pdtype)
    x = jnp.take(embedding_VxD, tokens_BxS, axis=0).astype(dtype)
    per_layer = []
    for i in range(cfg.num_layers):
      x, aux = Block(cfg, name=f"layers_{i}")(x, positions_BxS, decode)
      per_layer.append(aux)
    x = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x)
    if cfg.tie_embeddings:
      logits = jnp.dot(x, embedding_VxD.T.astype(dtype))
    else:
      logits = QDense(cfg.vocab_size, ("embed", "vocab"), cfg.quant, cfg.quant.lm_head_code,
                      dtype=dtype, param_dtype=pdtype, name="lm_head")(x)
    for key in AUX_KEYS:
      self.sow("intermediates", key, jnp.stack([a[key] for a in per_layer]))
    return logits.astype(jnp.float32)


def routing_aux(intermediates) -> dict:
  """Unpacks sown routing tensors: {key: array stacked over layers [L, ...]}."""
  return {key: intermediates[key][0] for key in AUX_KEYS}


def forward_with_aux(model: MoETransformer, variables, tokens_BxS):
  """Logits and routing tensors in one pass: (logits [B, S, V], aux dict)."""
  logits, state = model.apply(variables, tokens_BxS, mutable=["intermediates"])
  return logits, routing_aux(state["intermediates"])


def init_model(cfg: ModelConfig, rng: jax.Array):
  """Initialises parameters and default quant codes.

  Returns:
    (model, params, quant): unboxed params and the `quant` collection (bit codes as
    int32 arrays, mirroring the module tree).
  """
  model = MoETransformer(cfg)
  tokens = jnp.zeros((1, 8), jnp.int32)
  # Jitted: eagerly, every initializer and reshape is its own XLA compile (seconds on a CPU).
  variables = nn.meta.unbox(jax.jit(model.init)(rng, tokens))
  return model, variables["params"], variables["quant"]


def param_axes(cfg: ModelConfig):
  """Logical axis names of every parameter (a pytree of PartitionSpec of logical names)."""
  model = MoETransformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return nn.get_partition_spec(abstract)["params"]
