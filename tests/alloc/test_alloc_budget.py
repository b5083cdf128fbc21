"""Tests for the byte table and the bits-to-bytes budget."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeqjax.alloc import budget


def test_bytes_table_hand_worked():
  # 1000 weights, group 64 -> ceil(1000 / 64) = 16 fp16 scales = 32 bytes on every quantized choice.
  #   fp: 2000 bytes (bf16, no scales); ternary "2bit": 250 + 32; int2: 250 + 32; int3: 375 + 32;
  #   int4: 500 + 32; int8: 1000 + 32.
  # 1001 weights: packed bytes round up (ceil(2002 / 8) = 251) and still 16 scales.
  table = budget.bytes_table(np.array([[1000, 1001]]), (0, 1, 2, 3, 4, 8), group_size=64)
  np.testing.assert_array_equal(table[0, 0], [2000, 282, 282, 407, 532, 1032])
  np.testing.assert_array_equal(table[0, 1], [2002, 283, 283, 408, 533, 1033])
  assert table.dtype == np.int64


def test_bytes_table_base3_and_fp32_scales():
  # base3 packs 5 trits per byte: ceil(1000 / 5) = 200, ceil(1001 / 5) = 201; 8 fp32 scales = 32.
  table = budget.bytes_table(np.array([[1000], [1001]]), (1,), group_size=128, scale_bytes=4,
                             ternary_packing="base3")
  np.testing.assert_array_equal(table[:, 0, 0], [232, 233])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10**9), st.sampled_from([1, 2, 3, 4, 8]), st.sampled_from([32, 64, 128]))
def test_bytes_table_covers_every_bit(n, code, group):
  got = int(budget.bytes_table(np.array([[n]]), (code,), group_size=group)[0, 0, 0])
  bits = 2 if code == 1 else code
  scales = 2 * ((n + group - 1) // group)
  # Never a byte short of the packed bits, never a whole byte over.
  assert 8 * (got - scales) >= n * bits > 8 * (got - scales - 1)


def test_budget_from_bits_is_exact_in_decimal():
  # 2.32 * 100 / 8 is 28.999999999999996 in float; the budget means exactly 29 bytes.
  assert 2.32 * 100 / 8 < 29
  assert budget.budget_from_bits(2.32, 100) == 29
  assert budget.budget_from_bits(1.58, 100) == 19  # 19.75 rounds down: never over the budget
  assert budget.budget_from_bits(2.0, np.array([[40, 40], [100, 20]])) == 50


def test_budget_and_table_agree_on_uniform_allocation():
  # 2.25 bits per weight with group-64 fp16 scales is exactly int2 plus its scales.
  n = np.full((2, 4), 64 * 100)
  table = budget.bytes_table(n, (1, 2, 4), group_size=64)
  assert budget.budget_from_bits(2.25, n) == int(table[..., 1].sum())


def test_budget_inputs_are_checked():
  with pytest.raises(ValueError, match="positive number of bits"):
    budget.budget_from_bits(0.0, 10)
  with pytest.raises(ValueError, match="non-negative integer"):
    budget.budget_from_bits(2.0, 10.5)
  with pytest.raises(ValueError, match="group_size"):
    budget.bytes_table(np.array([[10]]), (2,), group_size=0)
  with pytest.raises(ValueError, match="scale_bytes"):
    budget.bytes_table(np.array([[10]]), (2,), group_size=32, scale_bytes=3)
  with pytest.raises(ValueError, match="unsupported bit code 5"):
    budget.bytes_table(np.array([[10]]), (5,), group_size=32)
