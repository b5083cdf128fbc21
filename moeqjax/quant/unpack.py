"""Unpacking and dequantization of packed weights inside a jitted computation (jax, traceable)."""

# The inverse of `packing` (host-side numpy) written in jax ops, so that a packed weight stays packed
# in device memory and is expanded only inside the forward pass. The bit layout is the one of
# `packing`: one little-endian bit stream per tensor (per expert for stacked expert tensors).
#   - intN (N in 2, 4, 8): a byte holds 8 / N whole values.
#   - int3: values straddle bytes; 3 bytes hold 8 values, so the stream is read in 3-byte chunks.
#   - ternary "2bit": 2-bit fields holding t + 1; ternary "base3": 5 trits per byte in base 3.

from __future__ import annotations

import math

import jax.numpy as jnp

from moeqjax.quant import formats
from moeqjax.quant import granularity as gran
from moeqjax.quant.formats import QuantSpec
from moeqjax.quant.packing import TRITS_PER_BYTE_BASE3


def _unpack_stream(packed_xN, bits: int, count: int):
  """Unsigned `bits`-bit values [..., count] (int32) of little-endian bit streams [..., N] uint8."""
  chunk_bytes = bits // math.gcd(bits, 8)  # bytes that hold a whole number of values
  per_chunk = 8 * chunk_bytes // bits
  n_chunks = -(-count // per_chunk)
  lead = packed_xN.shape[:-1]
  need = n_chunks * chunk_bytes
  data = packed_xN.astype(jnp.uint32)
  if data.shape[-1] < need:  # the last chunk of an odd-length stream is short: pad with zeros
    data = jnp.pad(data, [(0, 0)] * len(lead) + [(0, need - data.shape[-1])])
  data = data[..., :need].reshape(*lead, n_chunks, chunk_bytes)
  word = sum(data[..., i] << (8 * i) for i in range(chunk_bytes))  # [..., n_chunks], LSB first
  shifts = jnp.arange(per_chunk, dtype=jnp.uint32) * bits
  values = (word[..., None] >> shifts) & ((1 << bits) - 1)
  return values.reshape(*lead, n_chunks * per_chunk)[..., :count].astype(jnp.int32)


def unpack_int(packed_xN, bits: int, count: int, signed: bool):
  """The values of `moeqjax.quant.pack_int` streams, as int32.

  Args:
    packed_xN: uint8 [..., N], one packed stream per leading index.
    bits: 2, 3, 4 or 8 (static).
    count: values per stream (static).
    signed: sign-extend from two's complement (symmetric grids) or not (asymmetric grids).

  Returns:
    int32 [..., count].
  """
  values = _unpack_stream(packed_xN, bits, count)
  if signed:
    values = jnp.where(values >= (1 << (bits - 1)), values - (1 << bits), values)
  return values


def unpack_ternary(packed_xN, packing: str, count: int):
  """Ternary values {-1, 0, 1} (int32) [..., count] of `pack_ternary_2bit` / `pack_ternary_base3`."""
  if packing == "2bit":
    return _unpack_stream(packed_xN, 2, count) - 1
  digits = packed_xN.astype(jnp.int32)[..., None] // (3 ** jnp.arange(TRITS_PER_BYTE_BASE3)) % 3
  return digits.reshape(*packed_xN.shape[:-1], -1)[..., :count] - 1


def dequantize_packed(values_xN, scales, zero_points, code: int, spec: QuantSpec, shape):
  """Float32 weights from packed integer codes: (q - zero_point) * scale per group.

  The arithmetic is the fake quantizer's, in the same order, so the result equals
  `quantize_dequantize` of the weight that was packed.

  Args:
    values_xN: uint8 [..., N] packed streams, one per leading index of `shape`'s batch dims
      (e.g. [n, N] for n experts of one code, [N] for one matrix).
    scales: [..., n_in_groups, n_cols] stored scales (float16 or float32).
    zero_points: uint8 zero points like `scales` (asymmetric intN), or None.
    code: the bit code of every stream here (static): 1 ternary or 2, 3, 4, 8.
    spec: the quantization spec the weight was packed with.
    shape: the weight shape [..., in, out] (static).

  Returns:
    float32 weight of `shape`.
  """
  count = shape[-2] * shape[-1]
  if code == formats.TERNARY:
    q = unpack_ternary(values_xN, spec.ternary_packing, count)
  else:
    q = unpack_int(values_xN, code, count, signed=spec.symmetric)
  q_g = q.astype(jnp.float32).reshape(gran.grouped_shape(shape, spec))
  if zero_points is not None:
    q_g = q_g - gran.scales_to_stats(zero_points.astype(jnp.float32), shape, spec)
  w_g = q_g * gran.scales_to_stats(scales.astype(jnp.float32), shape, spec)
  return gran.from_groups(w_g, shape)
