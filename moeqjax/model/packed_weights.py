"""Weights read from the `packed` collection: dequantized inside the forward pass, experts by id."""

# A module that finds its weight in the `packed` variable collection (see moeqjax.quant.packed_tensor)
# uses it instead of a float param: the same module serves the teacher, the fake-quant student and the
# packed model. Code names in the dict keys are static (pytree structure), so each code's unpacking is
# compiled once; the per-expert codes and slots are data.

from __future__ import annotations

import jax.numpy as jnp

from moeqjax.quant import packed_tensor as pt
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


def experts(node: dict, idx_M, shape, spec: QuantSpec):
  """Float32 weights [M, in, out] of the experts `idx_M` [M] of a packed `pack_experts` node.

  Only the rows of the selected experts are read from each code's buffer, so decode touches
  k/E of the expert bytes (times the number of codes present in a mixed layer).
  """
  m = idx_M.shape[0]
  codes_M = jnp.take(node[pt.EXPERT_CODES], idx_M)
  slot_M = jnp.take(node[pt.EXPERT_SLOT], idx_M)
  out = None
  for key, bufs in _buffers(node):
    code = pt.code_of_key(key)
    rows = jnp.clip(slot_M, 0, bufs["values"].shape[0] - 1)
    zero_points = bufs.get("zero_points")
    w = dequantize_packed(
        jnp.take(bufs["values"], rows, axis=0), jnp.take(bufs["scales"], rows, axis=0),
        None if zero_points is None else jnp.take(zero_points, rows, axis=0), code, spec,
        (m, *shape))
    out = w if out is None else jnp.where((codes_M == code)[:, None, None], w, out)
  return out
