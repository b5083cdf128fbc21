"""Basic layers: RMSNorm, rotary embeddings, and a dense projection with optional fake quantization."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from moeqjax import quant as q
from moeqjax.model import packed_weights
from moeqjax.model.config import QuantRules

Initializer = Callable[..., jax.Array]


def quant_codes(module: nn.Module, name: str, default: Callable[[], jax.Array]):
  """The live bit codes of `module` from the `quant` collection, or None when absent.

  Only a model applied with a `quant` collection (the student) is quantized; the same
  module applied with params alone (the teacher) runs in full precision. At init, every
  collection is mutable, so the default codes from the rules are written.
  """
  if module.has_variable("quant", name) or module.is_mutable_collection("quant"):
    return module.variable("quant", name, default).value
  return None


def maybe_quant_act(x: jax.Array, rules: QuantRules, code) -> jax.Array:
  """int8 per-token activation fake quantization on the input of a quantized matmul.

  Args:
    x: the matmul input [..., D].
    rules: the quant rules (act_bits 0 is off).
    code: the matmul's one bit code (traced int32 scalar), or None in the teacher. Code 0 (full
      precision) leaves x as it is. Per-expert codes go through expert_act_quant instead.

  Returns:
    x or its int8 fake quantization, same shape and dtype.
  """
  if code is None or rules.act_bits == 0:
    return x
  return jnp.where(jnp.asarray(code) != q.FP, q.quantize_act_int8(x), x)


def expert_act_quant(x_TxD: jax.Array, rules: QuantRules, codes_E):
  """The MoE dispatch's W*A8 inputs: (x_q_TxD, act_quant_E), or (None, None) when off.

  Each routed expert reads x_q_TxD when its code is quantized and x_TxD when it is 0 (full
  precision), so a full-precision expert is never fed quantized activations.
  """
  if codes_E is None or rules.act_bits == 0:
    return None, None
  return q.quantize_act_int8(x_TxD), codes_E != q.FP


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32."""

  eps: float
  axis_name: str = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param(
        "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rope_tables(positions_BxS: jax.Array, head_dim: int, theta: float):
  """cos/sin tables [B, S, A] for the half-split (GPT-NeoX / Hugging Face) rotary layout."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions_BxS.astype(jnp.float32)[..., None] * inv_freq  # [B, S, A/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x_BxSxNxA: jax.Array, cos_BxSxA: jax.Array, sin_BxSxA: jax.Array) -> jax.Array:
  """Rotates query/key heads; x is [B, S, heads, A]."""
  half = x_BxSxNxA.shape[-1] // 2
  x1, x2 = x_BxSxNxA[..., :half], x_BxSxNxA[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos, sin = cos_BxSxA[:, :, None, :], sin_BxSxA[:, :, None, :]
  out = x_BxSxNxA.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
  return out.astype(x_BxSxNxA.dtype)


class QDense(nn.Module):
  """x @ kernel[in, out] (+ bias); the kernel is fake-quantized when the student has codes for it."""

  features: int
  kernel_axes: tuple[str, str]
  rules: QuantRules
  code: int  # static rule: 0 means this projection is never quantized
  use_bias: bool = False
  kernel_init: Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1], self.features)
    if self.has_variable(packed_weights.COLLECTION, "kernel"):  # serving from packed weights
      node = self.get_variable(packed_weights.COLLECTION, "kernel")
      kernel = packed_weights.matrix(node, shape, self.rules.spec())
      x = maybe_quant_act(x, self.rules, packed_weights.code_of_matrix(node))
    else:
      kernel = self.param(
          "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes), shape,
          self.param_dtype)
      codes = None
      if self.code:
        codes = quant_codes(self, "bits", lambda: jnp.asarray(self.code, jnp.int32))
      if codes is not None:
        kernel = q.fake_quant(kernel, codes, self.rules.spec())
        x = maybe_quant_act(x, self.rules, codes)
    y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param(
          "bias", nn.with_logical_partitioning(nn.initializers.zeros, (self.kernel_axes[1],)),
          (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
