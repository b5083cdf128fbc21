"""Tests for the paper's two-level and three-level allocation rules."""

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeqjax.alloc import paper

# Equally spaced bits for the level rules' arithmetic: int4/int3/int2 with their own bit counts.
EVEN = {2: 2.0, 3: 3.0, 4: 4.0}


@pytest.mark.parametrize("b_avg, n_high", [
    (1.0, 0),      # below the low level: clipped to 0
    (2.0, 0),      # exactly the low level
    (2.3, 2),      # 0.3 * 8 = 2.4 -> 2
    (2.5, 4),      # half of the experts
    (2.5625, 5),   # 0.5625 * 8 = 4.5: halves round up (numpy's round would give 4)
    (3.0, 8),      # exactly the high level
    (3.5, 8),      # above the high level: clipped to E
])
def test_two_level_count_matches_formula(b_avg, n_high):
  order = np.array([5, 2, 7, 0, 1, 3, 6, 4])
  codes = paper.two_level(order, b_avg, high=3, low=2, code_bits={3: 3.0, 2: 2.0})
  # The first n_high experts of the ORDER (not the lowest ids) get the high level.
  want = np.full(8, 2)
  want[order[:n_high]] = 3
  np.testing.assert_array_equal(codes, want)


def test_two_level_with_ternary_uses_nominal_158_bits():
  # (2.29 - 1.58) / (3 - 1.58) = 0.5 of 8 experts -> 4 at int3, 4 ternary.
  codes = paper.two_level(np.arange(8), 2.29, high=3, low=1)
  np.testing.assert_array_equal(codes, [3, 3, 3, 3, 1, 1, 1, 1])
  # Counting ternary at its 2-bit storage instead: (2.29 - 2) / 1 * 8 = 2.32 -> 2 high.
  codes = paper.two_level(np.arange(8), 2.29, high=3, low=1, code_bits={3: 3.0, 1: 2.0})
  assert int(np.sum(codes == 3)) == 2


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 40), st.floats(0.0, 10.0))
def test_two_level_matches_formula_property(num_experts, b_avg):
  codes = paper.two_level(np.arange(num_experts)[::-1], b_avg, high=4, low=1)
  frac = min(max(Fraction(b_avg) - Fraction(1.58), 0), Fraction(4) - Fraction(1.58)) / (
      Fraction(4) - Fraction(1.58))
  scaled = frac * num_experts
  # The exact rational count, rounded half up, is the oracle (skipping float-error ties at a half).
  if abs(float(scaled % 1) - 0.5) > 1e-8:
    assert int(np.sum(codes == 4)) == int(scaled + Fraction(1, 2))
  # The high experts are the first of the order (highest ids here, the order is reversed).
  high_ids = np.flatnonzero(codes == 4)
  assert set(high_ids.tolist()) == set(range(num_experts - len(high_ids), num_experts))


def test_three_level_hand_worked_counts():
  # Levels 4/3/2 are equally spaced, b_even = 3.
  #   b_avg 3.0, E = 9: the even split (3, 3, 3).
  #   b_avg 3.5, E = 8: upper segment s = 0.5, p = (2/3, 1/6, 1/6): n_high = round(5.33) = 5,
  #     n_high + n_mid = round(6.67) = 7 -> (5, 2, 1); average (20 + 6 + 2) / 8 = 3.5.
  #   b_avg 2.5, E = 8: lower segment s = 0.5, p = (1/6, 1/6, 2/3) -> (1, 2, 5); average 2.5.
  #   b_avg 1.0 / 9.0: clipped to all low / all high.
  assert paper.three_level_counts(9, 3.0, (4, 3, 2), EVEN) == (3, 3, 3)
  assert paper.three_level_counts(8, 3.5, (4, 3, 2), EVEN) == (5, 2, 1)
  assert paper.three_level_counts(8, 2.5, (4, 3, 2), EVEN) == (1, 2, 5)
  assert paper.three_level_counts(8, 1.0, (4, 3, 2), EVEN) == (0, 0, 8)
  assert paper.three_level_counts(8, 9.0, (4, 3, 2), EVEN) == (8, 0, 0)


def test_three_level_default_levels_with_ternary():
  # Levels 3/2/1 at nominal bits 3/2/1.58: b_even = 6.58 / 3 = 2.1933. b_avg = 2.0 is on the lower
  # segment: s = (2 - 1.58) / (2.1933 - 1.58) = 0.6848, p_high = p_mid = 0.2283, so with E = 8
  # n_high = round(1.826) = 2 and n_high + n_mid = round(3.652) = 4 -> (2, 2, 4).
  order = np.array([6, 1, 0, 7, 3, 2, 5, 4])
  codes = paper.three_level(order, 2.0)
  want = np.full(8, 1)
  want[[6, 1]] = 3
  want[[0, 7]] = 2
  np.testing.assert_array_equal(codes, want)


def _closed_form(num_experts, b_avg, bits):
  # The documented closed form, written out with exact fractions as an oracle.
  b_high, b_mid, b_low = (Fraction(b) for b in bits)
  b = Fraction(b_avg)
  b_even = (b_high + b_mid + b_low) / 3
  if b <= b_low:
    p_high, p_mid = Fraction(0), Fraction(0)
  elif b >= b_high:
    p_high, p_mid = Fraction(1), Fraction(0)
  elif b <= b_even:
    s = (b - b_low) / (b_even - b_low)
    p_high = p_mid = s / 3
  else:
    s = (b - b_even) / (b_high - b_even)
    p_high, p_mid = Fraction(1, 3) + 2 * s / 3, (1 - s) / 3
  return p_high * num_experts, (p_high + p_mid) * num_experts


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 50), st.floats(1.0, 5.0))
def test_three_level_counts_match_closed_form_and_budget(num_experts, b_avg):
  n_high, n_mid, n_low = paper.three_level_counts(num_experts, b_avg, (4, 3, 2), EVEN)
  assert min(n_high, n_mid, n_low) >= 0 and n_high + n_mid + n_low == num_experts
  x_high, x_high_mid = _closed_form(num_experts, b_avg, (4.0, 3.0, 2.0))
  # Round-half-up of the exact values, skipping cases within float error of a half.
  for x, got in ((x_high, n_high), (x_high_mid, n_high + n_mid)):
    if abs(float(x % 1) - 0.5) > 1e-8:
      assert got == int(x + Fraction(1, 2))
  # The fractional split meets the (clipped) budget exactly, so rounding two cumulative counts by at
  # most 1/2 each moves the average by at most (b_high - b_low) / (2E).
  avg = (4 * n_high + 3 * n_mid + 2 * n_low) / num_experts
  assert abs(avg - min(max(b_avg, 2.0), 4.0)) <= 1.0 / num_experts + 1e-9


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.floats(1.0, 4.5), st.floats(0.0, 1.0))
def test_three_level_is_monotone_in_budget(num_experts, b_lo, step):
  lo = paper.three_level_counts(num_experts, b_lo, (3, 2, 1))
  hi = paper.three_level_counts(num_experts, b_lo + step, (3, 2, 1))
  assert hi[0] >= lo[0] and hi[2] <= lo[2]


def test_allocate_layers_applies_rule_per_row():
  order = np.array([[0, 1, 2, 3], [3, 2, 1, 0]])
  codes = paper.allocate_layers(order, paper.two_level, 2.5, 3, 2, code_bits=EVEN | {3: 3.0})
  np.testing.assert_array_equal(codes, [[3, 3, 2, 2], [2, 2, 3, 3]])
  by_levels = paper.allocate_by_order(order, 2.5, (3, 2), code_bits={3: 3.0, 2: 2.0})
  np.testing.assert_array_equal(by_levels, codes)
  three = paper.allocate_by_order(order, 3.0, (4, 3, 2), code_bits=EVEN)
  np.testing.assert_array_equal(three[0], paper.three_level(order[0], 3.0, (4, 3, 2), EVEN))


def test_mean_bits():
  assert paper.mean_bits([[3, 1], [2, 2]]) == pytest.approx((3 + 1.58 + 2 + 2) / 4)
  assert paper.mean_bits([3, 1], {3: 3.0, 1: 2.0}) == pytest.approx(2.5)


def test_rules_reject_bad_inputs():
  with pytest.raises(ValueError, match="permutation"):
    paper.two_level([0, 0, 1], 2.0, 3, 1)
  with pytest.raises(ValueError, match="strictly decrease"):
    paper.two_level([0, 1], 2.0, 1, 3)
  with pytest.raises(ValueError, match="unsupported bit code 5"):
    paper.two_level([0, 1], 2.0, 5, 1)
  with pytest.raises(ValueError, match="no entry for codes \\[8\\]"):
    paper.two_level([0, 1], 2.0, 8, 2, code_bits={2: 2.0})
  with pytest.raises(ValueError, match="three codes"):
    paper.three_level([0, 1], 2.0, (3, 1))
  with pytest.raises(ValueError, match="finite"):
    paper.two_level([0, 1], float("nan"), 3, 1)
  with pytest.raises(ValueError, match="two codes"):
    paper.allocate_by_order(np.zeros((1, 1), int), 2.0, (3,))
