"""Routing probabilities, top-k gates and auxiliary losses vs numpy formulas."""

import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax.model.routing import load_balance_loss, router_z_loss, topk_gates


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


@pytest.mark.parametrize("top_k,norm", [(1, False), (2, True), (2, False), (3, True)])
def test_topk_gates_match_formula(top_k, norm):
  logits = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
  probs, gates, idx = topk_gates(jnp.asarray(logits), top_k, norm)
  ref_p = _softmax(logits)
  np.testing.assert_allclose(probs, ref_p, rtol=1e-6)
  ref_idx = np.argsort(-ref_p, axis=-1)[:, :top_k]
  np.testing.assert_array_equal(idx, ref_idx)
  ref_g = np.take_along_axis(ref_p, ref_idx, -1)
  if norm:
    ref_g = ref_g / ref_g.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.sum(gates, -1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(gates, ref_g, rtol=1e-6)


def test_mixtral_topk_then_softmax_equals_renormalised_softmax():
  logits = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
  _, gates, idx = topk_gates(jnp.asarray(logits), 2, True)
  mixtral = _softmax(np.take_along_axis(logits, np.asarray(idx), -1))
  np.testing.assert_allclose(gates, mixtral, rtol=1e-6)


def test_load_balance_loss_formula_and_balanced_value():
  logits = np.random.default_rng(2).normal(size=(9, 4)).astype(np.float32)
  probs, _, idx = topk_gates(jnp.asarray(logits), 2, True)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=4)
  ref = 4 * np.sum(counts / idx.size * np.asarray(probs).mean(0))
  np.testing.assert_allclose(load_balance_loss(probs, idx), ref, rtol=1e-6)
  # uniform probabilities and perfectly balanced assignments give exactly 1
  uniform = jnp.full((4, 4), 0.25)
  balanced = jnp.asarray([[0, 1], [2, 3], [0, 1], [2, 3]])
  np.testing.assert_allclose(load_balance_loss(uniform, balanced), 1.0, rtol=1e-6)


def test_router_z_loss_formula():
  logits = np.random.default_rng(3).normal(size=(5, 4)).astype(np.float32)
  lse = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(router_z_loss(jnp.asarray(logits)), np.mean(lse ** 2), rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_load_balance_loss_is_one_kth_of_the_hf_convention(top_k):
  """Issue 11 defect 5c: our balance loss is 1/k of transformers' load_balancing_loss_func (one layer;
  HF pools all layers' rows before the product, we average per-layer losses); the docstring says so."""
  torch = pytest.importorskip("torch", reason="needs torch (pip install -e .[parity])")
  mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
  logits = np.random.default_rng(4).normal(size=(11, 5)).astype(np.float32)
  probs, _, idx = topk_gates(jnp.asarray(logits), top_k, True)
  hf = float(mixtral.load_balancing_loss_func((torch.from_numpy(logits),), 5, top_k))
  np.testing.assert_allclose(top_k * float(load_balance_loss(probs, idx)), hf, rtol=1e-6)
  doc = " ".join(load_balance_loss.__doc__.split())
  assert "1/k" in doc and "load_balancing_loss_func" in doc
