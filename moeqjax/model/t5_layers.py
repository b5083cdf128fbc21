"""T5-style layers of the Switch Transformer: relative position bias, unscaled attention, dense ReLU FFN."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from moeqjax.model.attention import write_kv_cache
from moeqjax.model.config import SwitchConfig
from moeqjax.model.layers import QDense


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's bucket of each relative position (key position - query position), int32, same shape.

  Half of a direction's buckets hold the exact offsets 0.., the other half log-spaced offsets up
  to max_distance (beyond it, the last bucket). Bidirectional: the buckets are split between
  keys before and after the query; causal: keys after the query all share bucket 0. Computed in
  float32 as Hugging Face / Mesh TensorFlow do, so the log-spaced boundaries agree.
  """
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets = buckets + (relative_position > 0).astype(relative_position.dtype) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # log(0) is -inf for the exact offsets; jnp.where discards those lanes.
  log_ratio = (jnp.log(distance.astype(jnp.float32) / max_exact)
               / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = max_exact + jnp.where(is_small, 0, log_ratio).astype(relative_position.dtype)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)


class RelativePositionBias(nn.Module):
  """Learned per-head bias of each (query, key) pair's relative position bucket."""

  num_buckets: int
  max_distance: int
  num_heads: int
  bidirectional: bool
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_pos_S, key_pos_K):
    """float32 [H, S, K] for queries at query_pos_S and keys at key_pos_K (int positions)."""
    table_NxH = self.param(
        "embedding", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                  ("relpos_buckets", "relpos_heads")),
        (self.num_buckets, self.num_heads), self.param_dtype)
    relative_SxK = key_pos_K[None, :].astype(jnp.int32) - query_pos_S[:, None].astype(jnp.int32)
    bucket_SxK = relative_position_bucket(relative_SxK, self.bidirectional, self.num_buckets,
                                          self.max_distance)
    return jnp.transpose(jnp.take(table_NxH, bucket_SxK, axis=0), (2, 0, 1)).astype(jnp.float32)


def unscaled_attention(q_BxSxHxA, k_BxKxHxA, v_BxKxHxA, bias_HxSxK, mask_BxSxK):
  """softmax(q k^T + bias) v with no 1/sqrt(A) (T5 folds the scale into its init), in float32.

  Args:
    q_BxSxHxA, k_BxKxHxA, v_BxKxHxA: queries, keys and values.
    bias_HxSxK: the relative position bias, or None (cross-attention has none).
    mask_BxSxK: bool, which keys each query sees; None: every key.
  """
  scores = jnp.einsum("bsha,bkha->bhsk", q_BxSxHxA.astype(jnp.float32),
                      k_BxKxHxA.astype(jnp.float32))
  if bias_HxSxK is not None:
    scores = scores + bias_HxSxK[None]
  if mask_BxSxK is not None:
    scores = jnp.where(mask_BxSxK[:, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhsk,bkha->bsha", probs, v_BxKxHxA.astype(jnp.float32))
  return out.astype(q_BxSxHxA.dtype)


class T5Attention(nn.Module):
  """Multi-head attention with q/k/v/o projections and no bias terms (self or cross).

  `cache` says what the `cache` collection does: None (no cache); "append" (self-attention while
  decoding: this call's keys/values are written at slot `start` and the queries attend to the
  whole cache); "memory" (cross-attention while decoding: keys/values of `kv_BxKxD` are stored
  when it is given, and read back when it is None).
  """

  cfg: SwitchConfig

  @nn.compact
  def __call__(self, x_BxSxD, kv_BxKxD, bias_HxSxK, mask_BxSxK, cache: str | None = None,
               start=0):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, s, _ = x_BxSxD.shape
    h, a = cfg.num_heads, cfg.d_kv

    def proj(name, feats, axes):
      return QDense(feats, axes, cfg.quant, cfg.quant.attn_code, dtype=dtype, param_dtype=pdtype,
                    name=name)

    q = proj("q_proj", h * a, ("embed", "heads"))(x_BxSxD).reshape(b, s, h, a)
    if cache == "memory" and kv_BxKxD is None:
      k = self.get_variable("cache", "cached_key")
      v = self.get_variable("cache", "cached_value")
    else:
      k = proj("k_proj", h * a, ("embed", "heads"))(kv_BxKxD)
      v = proj("v_proj", h * a, ("embed", "heads"))(kv_BxKxD)
      k, v = (t.reshape(b, kv_BxKxD.shape[1], h, a) for t in (k, v))
      if cache == "memory":
        self.put_variable("cache", "cached_key", k)
        self.put_variable("cache", "cached_value", v)
      elif cache == "append":
        k, v = write_kv_cache(self, k, v, start)
    out = unscaled_attention(q, k, v, bias_HxSxK, mask_BxSxK).reshape(b, s, h * a)
    return proj("o_proj", cfg.d_model, ("heads", "embed"))(out)


class DenseReluFF(nn.Module):
  """The dense (non-sparse) Switch / T5 FFN: wo(relu(wi(x))), quantized by the shared-FFN rule."""

  cfg: SwitchConfig

  @nn.compact
  def __call__(self, x_BxSxD):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def dense(name, feats, axes):
      return QDense(feats, axes, cfg.quant, cfg.quant.shared_code, dtype=dtype,
                    param_dtype=pdtype, name=name)

    h = jax.nn.relu(dense("wi", cfg.d_ff, ("embed", "mlp"))(x_BxSxD))
    return dense("wo", cfg.d_model, ("mlp", "embed"))(h)
