"""The paper's order-based allocation rules: two levels, three levels, the same rule for every layer."""

# Chowdhury et al. (ICLR 2026) allocate by rank only: the first experts of a sensitivity order get the
# high level. The average here is over experts (every expert counts once) in NOMINAL bits per weight,
# which is how the paper states its budgets; the exact solver (solver.py) is the one that counts bytes.

from __future__ import annotations

import types
from typing import Callable, Mapping, Sequence

import numpy as np

from moeqjax.quant import formats

# Nominal bits per weight of each code for the paper rules. Ternary counts log2(3) ~ 1.58 bits, the
# information content the paper (and BitNet b1.58) quotes, not its 2.0 / 1.6 bit storage; full
# precision counts as bf16.
NOMINAL_BITS: Mapping[int, float] = types.MappingProxyType(
    {0: 16.0, 1: 1.58, 2: 2.0, 3: 3.0, 4: 4.0, 8: 8.0})

# Counts are real-valued before rounding; the slack keeps decimal budgets such as 2.3 from rounding
# the wrong way on float error (e.g. 2.4999999999 instead of 2.5).
_ROUND_SLACK = 1e-9


def round_half_up(x: float) -> int:
  """Rounds to the nearest integer, halves up (unlike Python's and numpy's round-half-to-even)."""
  return int(np.floor(x + 0.5 + _ROUND_SLACK))


def check_order(order_E) -> np.ndarray:
  """Validates one layer's order.

  Args:
    order_E: [E] expert ids, most sensitive first.

  Returns:
    [E] int64 order.

  Raises:
    ValueError: if the order is not a permutation of range(E).
  """
  order = np.asarray(order_E)
  if order.ndim != 1:
    raise ValueError(
        f"order has shape {order.shape} but must be [E] for one layer; use allocate_layers for [L, E]")
  if order.dtype.kind not in "iu" or not np.array_equal(np.sort(order), np.arange(order.size)):
    raise ValueError(
        f"order {order.tolist()} must be a permutation of 0..{order.size - 1}, e.g. from"
        " sensitivity_order or combined_order")
  return order.astype(np.int64)


def level_bits(levels: Sequence[int], code_bits: Mapping[int, float] | None) -> list[float]:
  """Bits of each level, checked to strictly decrease (levels are given high to low).

  Args:
    levels: bit codes, highest first, e.g. (3, 1) or (3, 2, 1).
    code_bits: code -> bits per weight; None means NOMINAL_BITS.

  Returns:
    The bits of each level, in the order given.
  """
  code_bits = NOMINAL_BITS if code_bits is None else code_bits
  codes = [int(c) for c in formats.validate_codes(np.asarray(levels)).ravel()]
  missing = [c for c in codes if c not in code_bits]
  if missing:
    raise ValueError(f"code_bits has no entry for codes {missing}; add them, e.g. {dict(NOMINAL_BITS)}")
  bits = [float(code_bits[c]) for c in codes]
  if any(hi <= lo for hi, lo in zip(bits, bits[1:])):
    raise ValueError(
        f"levels {tuple(codes)} have bits {bits}, which must strictly decrease; list the levels"
        " from most to fewest bits, e.g. (3, 1)")
  return bits


def _check_budget(b_avg: float) -> float:
  b_avg = float(b_avg)
  if not np.isfinite(b_avg):
    raise ValueError(f"b_avg={b_avg} must be a finite average number of bits per weight, e.g. 2.0")
  return b_avg


def two_level(order_E, b_avg: float, high: int, low: int,
              code_bits: Mapping[int, float] | None = None) -> np.ndarray:
  """The paper's two-level rule: the first n_high experts of the order get `high`, the rest `low`.

  n_high = round(clip((b_avg - b_low) / (b_high - b_low), 0, 1) * E), rounding halves up. Rounding
  can put the average up to (b_high - b_low) / (2E) above b_avg; solve_exact never exceeds a budget.

  Args:
    order_E: [E] expert ids, most sensitive first.
    b_avg: target average bits per weight over the experts.
    high: code of the high level, e.g. 3.
    low: code of the low level, e.g. 1 (ternary).
    code_bits: code -> bits used for the average; None means NOMINAL_BITS (ternary = 1.58).

  Returns:
    [E] int32 codes indexed by expert id.
  """
  order = check_order(order_E)
  b_high, b_low = level_bits((high, low), code_bits)
  b_avg = _check_budget(b_avg)
  frac = float(np.clip((b_avg - b_low) / (b_high - b_low), 0.0, 1.0))
  n_high = round_half_up(frac * order.size)
  codes = np.full(order.size, int(low), dtype=np.int32)
  codes[order[:n_high]] = int(high)
  return codes


def three_level_counts(num_experts: int, b_avg: float, levels: Sequence[int] = (3, 2, 1),
                       code_bits: Mapping[int, float] | None = None) -> tuple[int, int, int]:
  """How many experts three_level puts at the high, mid and low level.

  The fractions (p_high, p_mid, p_low) move linearly with b_avg along two segments:
    b_avg <= b_low:             (0, 0, 1), all low;
    b_low <= b_avg <= b_even:   s = (b_avg - b_low) / (b_even - b_low),
                                (s/3, s/3, 1 - 2s/3);
    b_even <= b_avg <= b_high:  s = (b_avg - b_even) / (b_high - b_even),
                                (1/3 + 2s/3, (1-s)/3, (1-s)/3);
    b_avg >= b_high:            (1, 0, 0), all high;
  where b_even = (b_high + b_mid + b_low) / 3 is the average of the even three-way split. The
  fractional average equals b_avg exactly; the counts round the cumulative fractions (halves up):
  n_high = round(p_high * E), n_high + n_mid = round((p_high + p_mid) * E). With equally spaced levels
  (e.g. 4/3/2) b_even is the mid level's bits, so b_avg = b_mid gives the even split.

  Args:
    num_experts: E.
    b_avg: target average bits per weight over the experts.
    levels: (high, mid, low) codes.
    code_bits: code -> bits; None means NOMINAL_BITS.

  Returns:
    (n_high, n_mid, n_low), summing to E.
  """
  if len(levels) != 3:
    raise ValueError(f"levels {tuple(levels)} must be three codes (high, mid, low), e.g. (3, 2, 1)")
  b_high, b_mid, b_low = level_bits(levels, code_bits)
  b_avg = _check_budget(b_avg)
  b_even = (b_high + b_mid + b_low) / 3.0
  if b_avg <= b_low:
    p_high, p_mid = 0.0, 0.0
  elif b_avg >= b_high:
    p_high, p_mid = 1.0, 0.0
  elif b_avg <= b_even:
    s = (b_avg - b_low) / (b_even - b_low)
    p_high, p_mid = s / 3.0, s / 3.0
  else:
    s = (b_avg - b_even) / (b_high - b_even)
    p_high, p_mid = 1.0 / 3.0 + 2.0 * s / 3.0, (1.0 - s) / 3.0
  n_high = round_half_up(p_high * num_experts)
  # Rounding the cumulative fraction keeps the counts non-negative and summing to E.
  n_high_mid = max(n_high, min(num_experts, round_half_up((p_high + p_mid) * num_experts)))
  return n_high, n_high_mid - n_high, num_experts - n_high_mid


def three_level(order_E, b_avg: float, levels: Sequence[int] = (3, 2, 1),
                code_bits: Mapping[int, float] | None = None) -> np.ndarray:
  """Three-level variant: the most sensitive experts get the high level, then mid, the rest low.

  The counts come from three_level_counts (see there for the closed form).

  Args:
    order_E: [E] expert ids, most sensitive first.
    b_avg: target average bits per weight over the experts.
    levels: (high, mid, low) codes, e.g. (3, 2, 1) where 1 is ternary.
    code_bits: code -> bits; None means NOMINAL_BITS (ternary = 1.58).

  Returns:
    [E] int32 codes indexed by expert id.
  """
  order = check_order(order_E)
  n_high, n_mid, _ = three_level_counts(order.size, b_avg, levels, code_bits)
  high, mid, low = (int(c) for c in levels)
  codes = np.full(order.size, low, dtype=np.int32)
  codes[order[:n_high]] = high
  codes[order[n_high:n_high + n_mid]] = mid
  return codes


def allocate_layers(order_LxE, rule: Callable[..., np.ndarray], *args, **kwargs) -> np.ndarray:
  """Applies one per-layer rule to every layer, as the paper does.

  Args:
    order_LxE: [L, E] orders, most sensitive expert first in each row.
    rule: a per-layer rule such as two_level or three_level, called as rule(order_E, *args, **kwargs).
    *args: passed to rule after the order (e.g. b_avg, high, low).
    **kwargs: passed to rule.

  Returns:
    [L, E] int32 codes.
  """
  order = np.asarray(order_LxE)
  if order.ndim != 2:
    raise ValueError(
        f"order_LxE has shape {order.shape} but must be [L, E]; call the rule itself for one layer")
  codes = np.empty(order.shape, dtype=np.int32)
  for l in range(order.shape[0]):
    codes[l] = rule(order[l], *args, **kwargs)
  return codes


def mean_bits(codes, code_bits: Mapping[int, float] | None = None) -> float:
  """Average bits per weight over experts, every expert counted once.

  Args:
    codes: bit codes of any shape, e.g. [E] or [L, E].
    code_bits: code -> bits; None means NOMINAL_BITS.

  Returns:
    The mean of code_bits[code] over all entries.
  """
  code_bits = NOMINAL_BITS if code_bits is None else code_bits
  arr = formats.validate_codes(codes)
  if arr.size == 0:
    raise ValueError("codes is empty; pass at least one expert's code")
  missing = sorted(set(int(c) for c in np.unique(arr)) - set(code_bits))
  if missing:
    raise ValueError(f"code_bits has no entry for codes {missing}; add them, e.g. {dict(NOMINAL_BITS)}")
  table = np.vectorize(lambda c: float(code_bits[int(c)]), otypes=[np.float64])
  return float(np.mean(table(arr)))


def allocate_by_order(order_LxE, b_avg: float, levels: Sequence[int],
                      code_bits: Mapping[int, float] | None = None) -> np.ndarray:
  """The paper's rule for every layer: two_level for two levels, three_level for three.

  Args:
    order_LxE: [L, E] orders, most sensitive (most bits) expert first in each row.
    b_avg: target average bits per weight over the experts of each layer.
    levels: (high, low) or (high, mid, low) codes, e.g. (3, 1) or (3, 2, 1).
    code_bits: code -> bits; None means NOMINAL_BITS (ternary = 1.58).

  Returns:
    [L, E] int32 codes.
  """
  levels = tuple(int(c) for c in levels)
  if len(levels) == 2:
    return allocate_layers(order_LxE, two_level, b_avg, levels[0], levels[1], code_bits=code_bits)
  if len(levels) == 3:
    return allocate_layers(order_LxE, three_level, b_avg, levels, code_bits=code_bits)
  raise ValueError(
      f"levels {levels} must be two codes (high, low) or three (high, mid, low), e.g. (3, 1)")
