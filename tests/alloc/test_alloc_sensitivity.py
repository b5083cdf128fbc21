"""Tests for sensitivity scores and the paper's combined order."""

import math
import statistics

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeqjax.alloc import sensitivity


def test_router_norm_change_is_end_minus_start():
  start = np.array([[1.0, 2.0, 3.0]])
  end = np.array([[1.5, 1.0, 3.0]])
  np.testing.assert_allclose(sensitivity.router_norm_change(start, end), [[0.5, -1.0, 0.0]])


def test_router_norm_change_without_start_uses_final_norm():
  end = np.array([[1.5, 1.0], [0.2, 0.3]])
  out = sensitivity.router_norm_change(None, end)
  np.testing.assert_array_equal(out, end)
  out[0, 0] = 99.0  # a copy: the caller's statistics must not change
  assert end[0, 0] == 1.5


def test_router_norm_change_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="must be \\[L, E\\] for the same model"):
    sensitivity.router_norm_change(np.ones((2, 3)), np.ones((2, 4)))
  with pytest.raises(ValueError, match="x\\[None\\]"):
    sensitivity.router_norm_change(None, np.ones(3))


def test_router_row_norms_match_loop_oracle():
  rng = np.random.default_rng(0)
  w = rng.normal(size=(2, 5, 3))  # [L, D, E]
  got = sensitivity.router_row_norms(w)
  assert got.shape == (2, 3)
  for l in range(2):
    for s in range(3):
      want = math.sqrt(sum(float(w[l, d, s]) ** 2 for d in range(5)))
      assert got[l, s] == pytest.approx(want, rel=1e-12)


def test_neuron_variance_matches_loop_oracle():
  rng = np.random.default_rng(1)
  w = rng.normal(size=(2, 3, 4, 5)) * rng.uniform(0.1, 3.0, size=(1, 1, 1, 5))  # [L, E, D, F]
  got = sensitivity.neuron_variance(w)
  assert got.shape == (2, 3)
  for l in range(2):
    for s in range(3):
      # Population variance (ddof=0) over the D inputs of each hidden neuron, max over neurons.
      want = max(statistics.pvariance([float(w[l, s, d, i]) for d in range(4)]) for i in range(5))
      assert got[l, s] == pytest.approx(want, rel=1e-12)


def test_neuron_variance_picks_the_widest_neuron():
  w = np.zeros((1, 1, 2, 3))
  w[0, 0, :, 1] = [-2.0, 2.0]  # variance 4: the only non-constant neuron
  w[0, 0, :, 2] = [5.0, 5.0]  # large weights but zero variance
  assert sensitivity.neuron_variance(w)[0, 0] == pytest.approx(4.0)


def test_combined_order_hand_worked_example():
  lam = [0.3, -0.1, 0.7, 0.0, 0.5]
  var = [0.2, 0.1, 0.5, 1.8, 0.9]
  # By hand, zeta = 3:
  #   Lambda ascending: e1 (-0.1), e3 (0.0), e0 (0.3), e4 (0.5), e2 (0.7) -> initial [1, 3, 0, 4, 2].
  #   Visit in reverse of the initial order: e2, e4, e0, e3, e1.
  #   e2 (V 0.5): first e2' with 3V < 0.5 (V < 0.167) is e1 (0.1) at pos 0, ahead -> [2, 1, 3, 0, 4].
  #   e4 (V 0.9): needs V < 0.3: e2 (0.5) no, e1 (0.1) yes at pos 1 -> [2, 4, 1, 3, 0].
  #   e0 (V 0.2): needs V < 0.067: nobody -> unchanged.
  #   e3 (V 1.8): needs V < 0.6: e2 (0.5) at pos 0 qualifies -> [3, 2, 4, 1, 0]. In the INITIAL
  #     order e2 sat behind e3, so this step checks that the current order is scanned.
  #   e1 (V 0.1): needs V < 0.033: nobody.
  order = sensitivity.combined_order(lam, var, zeta=3.0)
  np.testing.assert_array_equal(order, [3, 2, 4, 1, 0])


def test_combined_order_leaves_expert_when_first_match_is_behind_it():
  lam = [0.0, 1.0, 2.0, 3.0, 4.0]
  var = [1.0, 0.9, 0.05, 0.4, 1.0]
  # By hand, zeta = 3, initial [0, 1, 2, 3, 4]; visit 4, 3, 2, 1, 0.
  #   e4 (V 1.0): needs V < 0.333: e0 1.0 no, e1 0.9 no, e2 0.05 yes at pos 2 -> [0, 1, 4, 2, 3].
  #   e3 (V 0.4): needs V < 0.133: e2 (pos 3) is the first match and sits ahead of e3 (pos 4)
  #     -> [0, 1, 4, 3, 2].
  #   e2 (V 0.05): needs V < 0.0167: nobody.
  #   e1 (V 0.9): needs V < 0.3: e0 (pos 0) does not qualify; the first match e2 is at pos 4,
  #     behind e1 (pos 1) -> unchanged.
  #   e0 (V 1.0): already at the front -> unchanged.
  order = sensitivity.combined_order(lam, var, zeta=3.0)
  np.testing.assert_array_equal(order, [0, 1, 4, 3, 2])


def test_combined_order_ties_and_strict_inequality():
  # Equal Lambda: the stable sort keeps expert ids in order. 3 * V[e2] == V[e] is not a promotion.
  lam = [1.0, 1.0, 0.5, 1.0]
  var = [1.0, 3.0, 1.0, 1.0]
  np.testing.assert_array_equal(sensitivity.combined_order(lam, var, zeta=3.0), [2, 0, 1, 3])
  # A hair above the ratio promotes e1 ahead of the first low-variance expert (e2 at the front).
  var = [1.0, 3.0 + 1e-9, 1.0, 1.0]
  np.testing.assert_array_equal(sensitivity.combined_order(lam, var, zeta=3.0), [1, 2, 0, 3])


def test_combined_order_layers_matches_per_layer_calls():
  rng = np.random.default_rng(2)
  lam = rng.normal(size=(3, 6))
  var = rng.uniform(0.01, 1.0, size=(3, 6))
  got = sensitivity.combined_order_layers(lam, var, zeta=3.0)
  for l in range(3):
    np.testing.assert_array_equal(got[l], sensitivity.combined_order(lam[l], var[l], zeta=3.0))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7).flatmap(lambda e: st.tuples(
    st.lists(st.integers(-3, 3), min_size=e, max_size=e),
    st.lists(st.floats(0.0, 10.0), min_size=e, max_size=e),
    st.floats(0.5, 5.0))))
def test_combined_order_properties(case):
  lam, var, zeta = case
  order = sensitivity.combined_order(lam, var, zeta)
  assert sorted(order.tolist()) == list(range(len(lam)))
  # With equal positive variances nobody is promoted: the order is the stable Lambda order.
  flat = sensitivity.combined_order(lam, [1.0] * len(lam), zeta)
  np.testing.assert_array_equal(flat, np.argsort(lam, kind="stable"))
  # The expert in front either leads the Lambda order or was promoted over a much narrower expert.
  first = int(order[0])
  lam_first = int(np.argsort(lam, kind="stable")[0])
  assert first == lam_first or var[first] > zeta * min(var)


def test_combined_order_rejects_bad_inputs():
  with pytest.raises(ValueError, match="negative"):
    sensitivity.combined_order([0.0, 1.0], [1.0, -1.0])
  with pytest.raises(ValueError, match="zeta"):
    sensitivity.combined_order([0.0, 1.0], [1.0, 1.0], zeta=0.0)
  with pytest.raises(ValueError, match="NaN"):
    sensitivity.combined_order([0.0, np.nan], [1.0, 1.0])


def test_sensitivity_order_is_stable_ascending():
  score = np.array([[0.2, -1.0, 0.2, 0.0]])
  np.testing.assert_array_equal(sensitivity.sensitivity_order(score), [[1, 3, 0, 2]])


def test_grad_sensitivity_conventions():
  g = np.array([[4.0, 1.0, 9.0]])
  counts = np.array([[2.0, 0.0, 3.0]])
  # Default: the same direction as Lambda (little gradient = small router change = sensitive).
  np.testing.assert_array_equal(sensitivity.grad_sensitivity(g), g)
  np.testing.assert_allclose(sensitivity.grad_sensitivity(g, counts), [[2.0, 1.0, 3.0]])
  flipped = sensitivity.grad_sensitivity(g, counts, larger_is_more_sensitive=True)
  np.testing.assert_allclose(flipped, [[-2.0, -1.0, -3.0]])
  np.testing.assert_array_equal(sensitivity.sensitivity_order(flipped), [[2, 0, 1]])
  with pytest.raises(ValueError, match="negative"):
    sensitivity.grad_sensitivity(-g)
  with pytest.raises(ValueError, match="counts_LxE has shape"):
    sensitivity.grad_sensitivity(g, np.ones((1, 2)))


def test_grad_norm_sum_is_a_separate_signal_from_lambda_under_adamw():
  """Issue 11 defect 5b: the gradient sums were documented as "the same signal" as Lambda.

  Under AdamW with global-norm clipping (our optimizer) a router row with tiny gradients moves as far
  as one with large gradients, so |Lambda| is not bounded by lr * sum ||g|| and the two rank experts
  differently. The docs must say they are separate signals.
  """
  import jax.numpy as jnp
  import optax
  from moeqjax.train import OptimConfig, make_optimizer
  lr, steps = 1e-2, 10
  tx = make_optimizer(OptimConfig(lr, 0, steps, 1.0, weight_decay=0.0, grad_clip=1.0))
  w = jnp.ones((4, 2))  # [D, E]: column s is expert s's router row
  u = jnp.asarray([1.0, -2.0, 0.5, 1.5])
  g = jnp.stack([1e-3 * u, 1.0 * u], axis=1)  # expert 0 gets 1000x smaller gradients
  opt, grad_sum = tx.init(w), np.zeros(2)
  start = np.linalg.norm(np.asarray(w), axis=0)
  for _ in range(steps):
    updates, opt = tx.update(g, opt, w)
    w = optax.apply_updates(w, updates)
    clipped = np.asarray(g) * min(1.0, 1.0 / float(jnp.linalg.norm(g)))
    grad_sum += np.linalg.norm(clipped, axis=0)
  lam = sensitivity.router_norm_change(start[None], np.linalg.norm(np.asarray(w), axis=0)[None])[0]
  assert abs(lam[0]) > 10 * lr * grad_sum[0]  # the "bound" fails by far
  np.testing.assert_allclose(abs(lam[0]), abs(lam[1]), rtol=0.05)  # same move, 1000x less gradient
  doc = " ".join(sensitivity.grad_sensitivity.__doc__.split())
  assert "separate signal" in doc and "same signal" not in doc
