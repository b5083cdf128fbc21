"""Tests for the byte table and the bits-to-bytes budget."""

import numpy as np
import pytest

from moeqjax.alloc import budget
from moeqjax.alloc import solver
from moeqjax.quant import memory
from moeqjax.quant.formats import QuantSpec

SHAPES = {"w_in": (64, 128), "w_gate": (64, 128), "w_out": (128, 64)}  # 3 * 8192 = 24576 weights
GROUP64 = QuantSpec(granularity="group", group_size=64)


def test_bytes_table_hand_worked():
  # One expert, group 64: 24576 weights -> 384 fp16 scales = 768 bytes on every quantized choice.
  #   fp: 2 * 24576 = 49152 (no scales); ternary "2bit": 24576 / 4 = 6144 + 768 = 6912;
  #   int2 the same; int3: 9216 + 768 = 9984; int4: 12288 + 768 = 13056; int8: 24576 + 768 = 25344.
  table = budget.bytes_table(SHAPES, 2, 3, (0, 1, 2, 3, 4, 8), GROUP64)
  assert table.shape == (2, 3, 6) and table.dtype == np.int64
  np.testing.assert_array_equal(table[1, 2], [49152, 6912, 6912, 9984, 13056, 25344])
  # base3 packs 5 trits per byte and each tensor is its own stream: 3 * ceil(8192 / 5) = 3 * 1639.
  base3 = budget.bytes_table(SHAPES, 1, 1, (1,), QuantSpec("group", 64, ternary_packing="base3"))
  assert int(base3[0, 0, 0]) == 3 * 1639 + 768


@pytest.mark.parametrize("spec", [GROUP64, QuantSpec(), QuantSpec("group", 32, symmetric=False)])
def test_bytes_table_agrees_with_memory_report(spec):
  choices = (0, 1, 2, 3, 4, 8)
  table = budget.bytes_table(SHAPES, 2, 4, choices, spec)
  rng = np.random.default_rng(0)
  codes = rng.choice(choices, size=(2, 4))
  _, total = solver.allocation_totals(codes, np.zeros(table.shape), table, choices)
  assert total == memory.expert_bytes(SHAPES, codes, spec)["total_bytes"]


def test_budget_from_bits_is_exact_in_decimal():
  # 2.32 * 100 / 8 is 28.999999999999996 in float; the budget means exactly 29 bytes.
  assert 2.32 * 100 / 8 < 29
  assert budget.budget_from_bits(2.32, 100) == 29
  assert budget.budget_from_bits(1.58, 100) == 19  # 19.75 rounds down: never over the budget
  assert budget.budget_from_bits(2.0, np.array([[40, 40], [100, 20]])) == 50


def test_budget_matches_memory_bits_per_weight():
  # 2.25 bits per weight with group-64 fp16 scales is exactly int2 plus its scales.
  n = budget.num_expert_weights(SHAPES, 2, 4)
  assert n == 2 * 4 * 24576
  table = budget.bytes_table(SHAPES, 2, 4, (1, 2, 4), GROUP64)
  assert budget.budget_from_bits(2.25, n) == int(table[..., 1].sum())
  report = memory.expert_bytes(SHAPES, np.full((2, 4), 2), GROUP64)
  assert report["bits_per_weight"] == pytest.approx(2.25)


def test_budget_inputs_are_checked():
  with pytest.raises(ValueError, match="positive number of bits"):
    budget.budget_from_bits(0.0, 10)
  with pytest.raises(ValueError, match="non-negative integer"):
    budget.budget_from_bits(2.0, 10.5)
  with pytest.raises(ValueError, match="expert_shapes is empty"):
    budget.bytes_table({}, 1, 1, (2,), GROUP64)
  with pytest.raises(ValueError, match="num_layers"):
    budget.bytes_table(SHAPES, -1, 1, (2,), GROUP64)
  with pytest.raises(ValueError, match="unsupported bit code 5"):
    budget.bytes_table(SHAPES, 1, 1, (5,), GROUP64)
