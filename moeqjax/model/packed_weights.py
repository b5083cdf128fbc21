"""Weights read from the `packed` collection: dequantized inside the forward pass, experts by id."""

# A module that finds its weight in the `packed` variable collection (see moeqjax.quant.packed_tensor)
# uses it instead of a float param: the same module serves the teacher, the fake-quant student and the
# packed model. Code names in the dict keys are static (pytree structure), so each code's unpacking is
# compiled once; the per-expert codes and slots are data.

from __future__ import annotations

import jax
import jax.numpy as jnp

from moeqjax.quant import packed_tensor as pt
from moeqjax.quant.formats import TERNARY
from moeqjax.quant.formats import QuantSpec
from moeqjax.quant.unpack import dequantize_packed

COLLECTION = "packed"


def _buffers(node: dict):
  return sorted((k, v) for k, v in node.items() if k not in (pt.EXPERT_CODES, pt.EXPERT_SLOT))


def matrix(node: dict, shape, spec: QuantSpec):
  """The float32 [in, out] matrix of a packed `pack_matrix` node."""
  (key, bufs), = _buffers(node)
  return dequantize_packed(bufs["values"], bufs["scales"], bufs.get("zero_points"),
                           pt.code_of_key(key), spec, tuple(shape))


def code_of_matrix(node: dict) -> int:
  """The (static) code of a packed matrix."""
  (key, _), = _buffers(node)
  return pt.code_of_key(key)


def experts(bank: dict, idx_M, shape, spec: QuantSpec):
  """Float32 weights [M, in, out] of the experts `idx_M` [M] of an `expert_bank`.

  Each selected expert is read once, at the width of the widest code in its layer, from its own
  offset in the layer's byte stream; it is then dequantized at every code present in the layer and
  the one matching its code is kept. Bytes read thus scale with k/E and with the layer's widest
  code, and the extra dequantization work is compute, not memory traffic.
  """
  m = idx_M.shape[0]
  count = shape[0] * shape[1]
  codes = sorted(pt.code_of_key(k) for k in bank[pt.PRESENT])
  widths = {c: pt.value_bytes(c, count, spec) for c in codes}
  widest = max(widths.values())
  offsets_M = jnp.take(bank["offset"], idx_M)
  rows_MxB = jax.vmap(lambda o: jax.lax.dynamic_slice(bank["values"], (o,), (widest,)))(offsets_M)
  scales = jnp.take(bank["scales"], idx_M, axis=0)
  zero_points = bank.get("zero_points")
  zero_points = None if zero_points is None else jnp.take(zero_points, idx_M, axis=0)
  codes_M = jnp.take(bank["codes"], idx_M)
  out = None
  for code in codes:
    w = dequantize_packed(rows_MxB[:, :widths[code]], scales,
                          None if code == TERNARY else zero_points, code, spec, (m, *shape))
    out = w if out is None else jnp.where((codes_M == code)[:, None, None], w, out)
  return out


def all_experts(bank: dict, shape, spec: QuantSpec):
  """Float32 weights [E, in, out] of every expert of an `expert_bank`, each code's bytes read once.

  The code buffers lie back to back in the stream (narrowest first), so each code's rows are a
  static slice of it; their experts are placed back in expert order.
  """
  count = shape[0] * shape[1]
  codes_E = bank["codes"]
  keys = pt.stream_order(list(bank[pt.PRESENT]), count, spec)
  out = jnp.zeros((codes_E.shape[0], *shape), jnp.float32)
  start = 0
  for key in keys:
    code = pt.code_of_key(key)
    n, width = bank[pt.PRESENT][key].shape[0], pt.value_bytes(code, count, spec)
    rows = bank["values"][start:start + n * width].reshape(n, width)
    start += n * width
    members = jnp.nonzero(codes_E == code, size=n)[0]  # in expert order, as packed
    zero_points = bank.get("zero_points")
    w = dequantize_packed(rows, jnp.take(bank["scales"], members, axis=0),
                          None if zero_points is None or code == TERNARY
                          else jnp.take(zero_points, members, axis=0), code, spec, (n, *shape))
    out = out.at[members].set(w)
  return out
