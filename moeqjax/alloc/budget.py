"""Byte accounting for the solver: per-expert bytes of each choice, and bits-to-bytes budgets."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping, Sequence

import numpy as np

from moeqjax.quant import formats
from moeqjax.quant import memory


def bytes_table(expert_shapes: Mapping[str, Sequence[int]], num_layers: int, num_experts: int,
                choices: Sequence[int], spec: formats.QuantSpec) -> np.ndarray:
  """Bytes that one expert takes under each choice, from the same accounting as the memory report.

  Every entry is quant.memory.weight_bytes summed over the expert's tensors (packed values, scales
  and, for asymmetric intN, zero points), so a budget met here is met in eval's memory numbers.
  Routed experts share one shape per model, so every [l, e] row is the same.

  Args:
    expert_shapes: weight name (e.g. "w_in", "w_gate", "w_out") -> ONE expert's [in, out] shape.
    num_layers: L.
    num_experts: E.
    choices: C bit codes, e.g. (1, 2, 3, 4, 8).
    spec: the quantization spec (granularity, group size, packing, scale bytes, symmetry).

  Returns:
    [L, E, C] int64 bytes.
  """
  if not expert_shapes:
    raise ValueError("expert_shapes is empty; pass e.g. {'w_in': (D, F), 'w_out': (F, D)}")
  for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name}={v!r} must be a non-negative int")
  codes = [int(c) for c in formats.validate_codes(np.asarray(choices)).ravel()]
  per_choice = [sum(memory.weight_bytes(shape, code, spec) for shape in expert_shapes.values())
                for code in codes]
  return np.tile(np.asarray(per_choice, dtype=np.int64), (num_layers, num_experts, 1))


def num_expert_weights(expert_shapes: Mapping[str, Sequence[int]], num_layers: int,
                       num_experts: int) -> int:
  """Number of routed-expert weights in the model: L * E * sum of the tensor sizes of one expert."""
  return num_layers * num_experts * sum(math.prod(shape) for shape in expert_shapes.values())


def budget_from_bits(avg_bits: float, n_weights_total) -> int:
  """Converts an average bits-per-weight budget into whole bytes, rounding down.

  The bits cover whatever the byte table counts (with bytes_table: packed weights plus scales), so
  e.g. 2.25 means "2.25 bits per expert weight, scales included", the same quantity as the memory
  report's bits_per_weight.

  Args:
    avg_bits: bits per weight, > 0, e.g. 2.25.
    n_weights_total: total number of expert weights (see num_expert_weights), an int or an array
      of counts that is summed.

  Returns:
    floor(avg_bits * n_weights_total / 8) bytes, computed exactly from avg_bits' decimal form.
  """
  if isinstance(avg_bits, bool) or not np.isfinite(float(avg_bits)) or float(avg_bits) <= 0:
    raise ValueError(f"avg_bits={avg_bits!r} must be a positive number of bits per weight, e.g. 2.25")
  n = np.asarray(n_weights_total)
  if n.dtype.kind not in "iu" or np.any(n < 0):
    raise ValueError("n_weights_total must be a non-negative integer weight count (or an array of them)")
  total = int(np.sum(n.astype(np.int64)))
  # str() of a float is its shortest round-trip decimal, so 2.3 means exactly 23/10 here; the
  # binary float 2.3 is a hair below it and would lose a byte to floor() on exact multiples.
  return math.floor(Fraction(str(float(avg_bits))) * total / 8)
