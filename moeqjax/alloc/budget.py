"""Byte accounting for the solver: per-expert bytes of each choice, and bits-to-bytes budgets."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

from moeqjax.quant import formats


def _exact_bits(code: int, ternary_packing: str) -> Fraction:
  # Exact rational bits per weight (1.6 -> 8/5) so that byte counts are exact integers, never a
  # float that rounds a byte short.
  return Fraction(formats.storage_bits(code, ternary_packing)).limit_denominator(64)


def bytes_table(n_weights_LxE, choices: Sequence[int], group_size: int, scale_bytes: int = 2,
                ternary_packing: str = "2bit") -> np.ndarray:
  """Bytes that each expert takes under each choice, scales included.

  A quantized choice stores ceil(n * bits / 8) bytes of packed weights (bits from
  formats.storage_bits: ternary 2.0 with "2bit", 1.6 with "base3") plus one symmetric scale of
  `scale_bytes` per `group_size` weights, ceil(n / group_size) * scale_bytes. Full precision (code 0)
  stores bf16 weights and no scales. Zero points (asymmetric intN) are not counted.

  Args:
    n_weights_LxE: [L, E] number of weights of each expert (all its matrices together).
    choices: C bit codes, e.g. (1, 2, 3, 4, 8).
    group_size: weights per scale; use the input dim for per-channel scales.
    scale_bytes: bytes per scale, 2 (fp16) or 4 (fp32).
    ternary_packing: "2bit" or "base3".

  Returns:
    [L, E, C] int64 bytes.
  """
  n = np.asarray(n_weights_LxE)
  if n.ndim != 2:
    raise ValueError(f"n_weights_LxE has shape {n.shape} but must be [L, E]")
  if n.dtype.kind not in "iu" or np.any(n < 0):
    raise ValueError(
        "n_weights_LxE must hold non-negative integer weight counts, e.g. 3 * D * F per expert")
  if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size <= 0:
    raise ValueError(f"group_size={group_size!r} must be a positive int, e.g. 32, 64 or 128")
  if scale_bytes not in formats.SCALE_BYTES:
    raise ValueError(f"scale_bytes={scale_bytes!r} is unsupported; choose from {formats.SCALE_BYTES}")
  codes = [int(c) for c in formats.validate_codes(np.asarray(choices)).ravel()]
  n = n.astype(np.int64)
  out = np.empty(n.shape + (len(codes),), dtype=np.int64)
  for c, code in enumerate(codes):
    bits = _exact_bits(code, ternary_packing)
    # ceil(n * p / q) in integer arithmetic: -(-a // b).
    packed = -(-(n * bits.numerator) // (8 * bits.denominator))
    scales = 0 if code == formats.FP else -(-n // group_size) * scale_bytes
    out[..., c] = packed + scales
  return out


def budget_from_bits(avg_bits: float, n_weights_total) -> int:
  """Converts an average bits-per-weight budget into whole bytes, rounding down.

  The bits cover whatever the byte table counts (with bytes_table: packed weights plus scales), so
  e.g. 2.25 means "2.25 bits per expert weight, scales included".

  Args:
    avg_bits: bits per weight, > 0, e.g. 2.25.
    n_weights_total: total number of expert weights, an int or an array of counts that is summed
      (e.g. the [L, E] table passed to bytes_table).

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
