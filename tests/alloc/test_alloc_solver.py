"""Tests for the exact budgeted solver against brute force."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeqjax.alloc import solver

CHOICES = (1, 2, 3, 4, 8)


def brute_force(cost, nbytes, budget):
  """Optimal total cost over every allocation within budget, or None if none fits."""
  n_layers, n_experts, n_choices = cost.shape
  cost_n = cost.reshape(-1, n_choices)
  bytes_n = nbytes.reshape(-1, n_choices)
  best = None
  for pick in itertools.product(range(n_choices), repeat=cost_n.shape[0]):
    total_bytes = sum(int(bytes_n[i, c]) for i, c in enumerate(pick))
    total_cost = sum(float(cost_n[i, c]) for i, c in enumerate(pick))
    if total_bytes <= budget and np.isfinite(total_cost) and (best is None or total_cost < best):
      best = total_cost
  return best


def random_case(rng, n_layers, n_experts, n_choices, byte_scale=1):
  # Cost falls and bytes rise with the choice index, like quantization error vs bit width.
  cost = np.sort(rng.uniform(0.0, 10.0, size=(n_layers, n_experts, n_choices)), axis=-1)[..., ::-1]
  nbytes = np.sort(rng.integers(1, 20, size=(n_layers, n_experts, n_choices)), axis=-1) * byte_scale
  return np.ascontiguousarray(cost), nbytes


@pytest.mark.parametrize("max_cells", [solver.DEFAULT_MAX_CELLS, 0])  # dense DP, then the sparse one
@pytest.mark.parametrize("seed", range(12))
def test_solve_exact_matches_brute_force(seed, max_cells):
  rng = np.random.default_rng(seed)
  n_layers, n_experts = [(1, 6), (2, 3), (3, 2), (2, 2)][seed % 4]
  n_choices = 3 + seed % 3
  cost, nbytes = random_case(rng, n_layers, n_experts, n_choices)
  choices = CHOICES[:n_choices]
  lo = int(nbytes.min(-1).sum())
  hi = int(nbytes.max(-1).sum())
  for budget in np.linspace(lo, hi, 5).astype(int):
    codes = solver.solve_exact(cost, nbytes, budget, choices, max_cells=max_cells)
    got_cost, got_bytes = solver.allocation_totals(codes, cost, nbytes, choices)
    assert got_bytes <= budget
    assert got_cost == pytest.approx(brute_force(cost, nbytes, budget), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("max_cells", [solver.DEFAULT_MAX_CELLS, 0])
def test_solve_exact_with_million_byte_counts(max_cells):
  # Realistic byte counts share a large gcd (here 4096), so the dense DP runs in gcd units and stays
  # tiny; the sparse DP must agree.
  rng = np.random.default_rng(7)
  cost, nbytes = random_case(rng, 2, 3, 4, byte_scale=4096 * 97)
  budget = int(nbytes.min(-1).sum() + 0.4 * (nbytes.max(-1).sum() - nbytes.min(-1).sum())) + 123
  codes = solver.solve_exact(cost, nbytes, budget, CHOICES[:4], max_cells=max_cells)
  got_cost, got_bytes = solver.allocation_totals(codes, cost, nbytes, CHOICES[:4])
  assert got_bytes <= budget
  assert got_cost == pytest.approx(brute_force(cost, nbytes, budget), rel=1e-12)


def test_solve_exact_with_coprime_large_bytes_uses_exact_sparse_dp(monkeypatch):
  # Byte counts near 1e7 with gcd 1 would need a dense table of ~1e8 cells: the sparse DP takes over.
  def no_dense(*args):
    raise AssertionError("the dense DP must not run on a table this large")

  monkeypatch.setattr(solver, "_dense_dp", no_dense)
  rng = np.random.default_rng(3)
  cost, _ = random_case(rng, 2, 3, 4)
  nbytes = np.sort(rng.integers(1_000_000, 10_000_000, size=(2, 3, 4)), axis=-1)
  nbytes[0, 0, 1] = nbytes[0, 0, 0] + 1  # a difference of 1 byte forces gcd 1
  budget = int(np.median(nbytes, axis=-1).sum())
  codes = solver.solve_exact(cost, nbytes, budget, CHOICES[:4])
  got_cost, got_bytes = solver.allocation_totals(codes, cost, nbytes, CHOICES[:4])
  assert got_bytes <= budget
  assert got_cost == pytest.approx(brute_force(cost, nbytes, budget), rel=1e-12)


def test_solve_exact_hand_worked():
  # Two experts, choices (ternary, int4): bytes (1, 3); costs e0 (10, 0), e1 (4, 1).
  # Budget 4 affords exactly one int4: upgrading e0 saves 10, e1 saves 3 -> e0 gets int4.
  cost = np.array([[[10.0, 0.0], [4.0, 1.0]]])
  nbytes = np.array([[[1, 3], [1, 3]]])
  np.testing.assert_array_equal(solver.solve_exact(cost, nbytes, 4, (1, 4)), [[4, 1]])
  np.testing.assert_array_equal(solver.solve_exact(cost, nbytes, 6, (1, 4)), [[4, 4]])
  np.testing.assert_array_equal(solver.solve_exact(cost, nbytes, 2.9, (1, 4)), [[1, 1]])


def test_solve_exact_not_greedy():
  # Greedy by cost saved per byte takes e0's cheap upgrade first and then cannot afford e1's.
  # Budget 10 above the floor: e0 upgrade costs 2 bytes and saves 3 (1.5/byte); e1 costs 10 and
  # saves 10 (1.0/byte). The optimum spends all 10 on e1 (saves 10 > 3).
  cost = np.array([[[3.0, 0.0], [10.0, 0.0]]])
  nbytes = np.array([[[0, 2], [0, 10]]])
  for max_cells in (solver.DEFAULT_MAX_CELLS, 0):
    codes = solver.solve_exact(cost, nbytes, 10, (2, 4), max_cells=max_cells)
    np.testing.assert_array_equal(codes, [[2, 4]])


def test_solve_exact_infinite_cost_forbids_a_choice():
  cost = np.array([[[5.0, np.inf, 0.0], [5.0, 1.0, 0.0]]])
  nbytes = np.array([[[1, 2, 8], [1, 2, 8]]])
  # Budget 4: e0 cannot take the forbidden middle choice, so e1 gets it.
  for max_cells in (solver.DEFAULT_MAX_CELLS, 0):
    codes = solver.solve_exact(cost, nbytes, 4, (1, 2, 8), max_cells=max_cells)
    np.testing.assert_array_equal(codes, [[1, 2]])
  # Forbidden cheapest choice raises the floor: e0's cheapest allowed choice is 8 bytes.
  cost = np.array([[[np.inf, 1.0], [0.0, 1.0]]])
  with pytest.raises(ValueError, match="of 9 bytes"):
    solver.solve_exact(cost, np.array([[[1, 8], [1, 8]]]), 8, (1, 8))
  with pytest.raises(ValueError, match="every choice"):
    solver.solve_exact(np.full((1, 1, 2), np.inf), np.ones((1, 1, 2), int), 8, (1, 8))


def test_solve_exact_infeasible_budget_message():
  cost = np.zeros((2, 2, 3))
  nbytes = np.broadcast_to(np.array([10, 20, 40]), (2, 2, 3))
  with pytest.raises(ValueError, match=r"budget 39 bytes is below the smallest possible allocation "
                     r"\(all experts at ternary \(code 1\)\) of 40 bytes"):
    solver.solve_exact(cost, nbytes, 39, (1, 2, 4))
  np.testing.assert_array_equal(solver.solve_exact(cost, nbytes, 40, (1, 2, 4)), np.ones((2, 2)))


def test_solve_exact_unconstrained_budget_takes_each_minimum():
  rng = np.random.default_rng(5)
  cost = rng.uniform(size=(2, 3, 4))
  nbytes = rng.integers(1, 9, size=(2, 3, 4))
  codes = solver.solve_exact(cost, nbytes, 10**9, CHOICES[:4])
  np.testing.assert_array_equal(codes, np.asarray(CHOICES[:4])[np.argmin(cost, axis=-1)])


def test_solve_exact_rejects_malformed_inputs():
  cost = np.zeros((1, 2, 2))
  with pytest.raises(ValueError, match="whole bytes"):
    solver.solve_exact(cost, np.full((1, 2, 2), 1.5), 10, (1, 2))
  with pytest.raises(ValueError, match="must match"):
    solver.solve_exact(cost, np.ones((1, 2, 3), int), 10, (1, 2))
  with pytest.raises(ValueError, match="repeats a code"):
    solver.solve_exact(cost, np.ones((1, 2, 2), int), 10, (2, 2))
  with pytest.raises(ValueError, match="C=2"):
    solver.solve_exact(cost, np.ones((1, 2, 2), int), 10, (1, 2, 4))
  with pytest.raises(ValueError, match="NaN"):
    solver.solve_exact(np.full((1, 2, 2), np.nan), np.ones((1, 2, 2), int), 10, (1, 2))


def test_sparse_dp_raises_instead_of_approximating():
  rng = np.random.default_rng(11)
  cost, _ = random_case(rng, 1, 6, 4)
  nbytes = np.sort(rng.integers(1_000_000, 10_000_000, size=(1, 6, 4)), axis=-1)
  budget = int(np.median(nbytes, axis=-1).sum())
  with pytest.raises(ValueError, match="max_states"):
    solver.solve_exact(cost, nbytes, budget, CHOICES[:4], max_cells=0, max_states=2)


@st.composite
def knapsack_cases(draw):
  n_layers = draw(st.integers(1, 2))
  n_experts = draw(st.integers(1, 3))
  n_choices = draw(st.integers(2, 4))
  shape = (n_layers, n_experts, n_choices)
  n = int(np.prod(shape))
  cost = np.array(draw(st.lists(st.floats(0.0, 100.0), min_size=n, max_size=n))).reshape(shape)
  unit = draw(st.sampled_from([1, 3, 1024, 999_983]))
  nbytes = np.array(draw(st.lists(st.integers(0, 40), min_size=n, max_size=n))).reshape(shape) * unit
  floor = int(nbytes.min(-1).sum())
  budget = floor + draw(st.integers(-unit, 60 * unit))
  max_cells = draw(st.sampled_from([solver.DEFAULT_MAX_CELLS, 0]))
  return cost, nbytes, budget, max_cells


@settings(max_examples=120, deadline=None)
@given(knapsack_cases())
def test_solve_exact_never_exceeds_budget_and_is_optimal(case):
  cost, nbytes, budget, max_cells = case
  choices = CHOICES[:cost.shape[-1]]
  if budget < int(nbytes.min(-1).sum()):
    with pytest.raises(ValueError, match="below the smallest possible allocation"):
      solver.solve_exact(cost, nbytes, budget, choices, max_cells=max_cells)
    return
  codes = solver.solve_exact(cost, nbytes, budget, choices, max_cells=max_cells)
  got_cost, got_bytes = solver.allocation_totals(codes, cost, nbytes, choices)
  assert got_bytes <= budget
  assert got_cost == pytest.approx(brute_force(cost, nbytes, budget), rel=1e-9, abs=1e-9)


def test_allocation_totals():
  cost = np.array([[[1.0, 2.0], [3.0, 4.0]]])
  nbytes = np.array([[[10, 20], [30, 40]]])
  # e0 at code 4 (index 1): cost 2, 20 bytes; e1 at code 1 (index 0): cost 3, 30 bytes.
  assert solver.allocation_totals([[4, 1]], cost, nbytes, (1, 4)) == (5.0, 50)
  with pytest.raises(ValueError, match="not among choices"):
    solver.allocation_totals([[2, 1]], cost, nbytes, (1, 4))
