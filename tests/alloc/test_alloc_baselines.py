"""Tests for the baseline allocations."""

import numpy as np
import pytest

from moeqjax.alloc import baselines
from moeqjax.alloc import paper
from moeqjax.alloc import solver


def test_uniform():
  codes = baselines.uniform(2, 3, 4)
  np.testing.assert_array_equal(codes, np.full((2, 3), 4))
  with pytest.raises(ValueError, match="unsupported bit code 5"):
    baselines.uniform(2, 3, 5)


def test_random_alloc_is_seeded_and_keeps_the_rule_counts():
  a = baselines.random_alloc(4, 8, 2.29, (3, 1), seed=0)
  np.testing.assert_array_equal(a, baselines.random_alloc(4, 8, 2.29, (3, 1), seed=0))
  assert not np.array_equal(a, baselines.random_alloc(4, 8, 2.29, (3, 1), seed=1))
  # (2.29 - 1.58) / (3 - 1.58) * 8 = 4 experts of every layer at int3, as in two_level.
  np.testing.assert_array_equal(np.sum(a == 3, axis=1), [4, 4, 4, 4])
  # Random orders differ between layers.
  assert len({tuple(row) for row in a}) > 1
  three = baselines.random_alloc(2, 9, 3.0, (4, 3, 2), seed=0, code_bits={4: 4.0, 3: 3.0, 2: 2.0})
  np.testing.assert_array_equal(np.sum(three == 3, axis=1), [3, 3])


def test_by_frequency_gives_frequent_experts_the_high_level():
  counts = np.array([[5, 50, 1, 20], [0, 3, 9, 9]])
  codes = baselines.by_frequency(counts, 2.5, (3, 2), code_bits={3: 3.0, 2: 2.0})
  # Two of four experts per layer at int3: the two most frequent; the tie 9/9 keeps both.
  np.testing.assert_array_equal(codes, [[2, 3, 2, 3], [2, 2, 3, 3]])
  # A tie at the boundary goes to the lower expert id.
  codes = baselines.by_frequency(np.array([[1, 7, 7, 7]]), 2.5, (3, 2), code_bits={3: 3.0, 2: 2.0})
  np.testing.assert_array_equal(codes, [[2, 3, 3, 2]])


def test_by_gate_weight_gives_heavy_experts_the_high_level():
  gate = np.array([[0.1, 0.6, 0.3]])
  codes = baselines.by_gate_weight(gate, 2.29, (3, 1))
  # round(0.5 * 3) = 2 experts at int3: the two largest mean gates, experts 1 and 2.
  np.testing.assert_array_equal(codes, [[1, 3, 3]])
  with pytest.raises(ValueError, match=">= 0"):
    baselines.by_gate_weight(-gate, 2.29, (3, 1))


def test_mc_moe_importance_formula():
  freq = np.array([[2.0, 6.0], [0.0, 0.0]])
  gate = np.array([[0.4, 0.9], [0.5, 0.5]])
  got = baselines.mc_moe_importance(freq, gate)
  # Shares 0.25 and 0.75; importance = share^1 * gate^1.5; a layer without tokens is 0.
  np.testing.assert_allclose(got, [[0.25 * 0.4 ** 1.5, 0.75 * 0.9 ** 1.5], [0.0, 0.0]])
  np.testing.assert_allclose(baselines.mc_moe_importance(freq / 8.0, gate), got)
  np.testing.assert_allclose(baselines.mc_moe_importance(freq, gate, alpha=2.0, beta=0.0)[0],
                             [0.25 ** 2, 0.75 ** 2])


def test_mc_moe_spends_bits_on_important_experts():
  freq = np.array([[10.0, 1.0, 5.0]])
  gate = np.array([[0.5, 0.5, 0.5]])
  choices = (1, 4)
  # Same quantization error everywhere: 1.0 at ternary, 0.1 at int4. Budget: one int4 upgrade.
  err = np.broadcast_to(np.array([1.0, 0.1]), (1, 3, 2))
  nbytes = np.broadcast_to(np.array([10, 20]), (1, 3, 2))
  codes = baselines.mc_moe(freq, gate, err, nbytes, 40, choices)
  np.testing.assert_array_equal(codes, [[4, 1, 1]])
  # And it is exactly the solver on importance * error.
  cost = baselines.mc_moe_importance(freq, gate)[..., None] * err
  np.testing.assert_array_equal(codes, solver.solve_exact(cost, nbytes, 40, choices))


def test_mc_moe_keeps_forbidden_choices_forbidden_at_zero_importance():
  freq = np.array([[0.0, 0.0]])
  gate = np.array([[0.5, 0.5]])
  err = np.array([[[np.inf, 0.0], [1.0, 0.0]]])
  nbytes = np.array([[[1, 5], [1, 5]]])
  codes = baselines.mc_moe(freq, gate, err, nbytes, 6, (1, 4))
  np.testing.assert_array_equal(codes[0, 0], 4)


def test_level_baselines_agree_with_paper_rule():
  counts = np.array([[3.0, 1.0, 2.0, 0.5]])
  want = paper.allocate_by_order(np.array([[0, 2, 1, 3]]), 2.0, (3, 2, 1))
  np.testing.assert_array_equal(baselines.by_frequency(counts, 2.0, (3, 2, 1)), want)
