"""The jitted train step: loss goes down, QAT terms, no recompile on a new allocation, router stats."""

import jax
import jax.numpy as jnp
import numpy as np

from helpers_train import JOINT, make_states, synthetic_tokens
from moeqjax.model import expert_codes, set_expert_codes
from moeqjax.data import sample_batch
from moeqjax.objectives import LossWeights
from moeqjax.train import jit_train_step, router_row_norms, with_quant


def _batch(tokens, step, b=4, s=16):
  return jnp.asarray(sample_batch(tokens, b, s, seed=0, step=step))


def test_loss_goes_down_on_a_tiny_batch():
  _, model, tx, state = make_states(qat=False, lr=1e-2, steps=30)
  step = jit_train_step(model, tx, LossWeights())
  batch = _batch(synthetic_tokens(), 0)
  losses = []
  for i in range(30):
    state, m = step(state, batch, jax.random.key(i))
    losses.append(float(m["train/task"]))
  assert losses[-1] < 0.6 * losses[0], losses


def test_qat_step_logs_every_term_and_reduces_loss():
  _, model, tx, state = make_states(qat=True, lr=5e-3, steps=20)
  step = jit_train_step(model, tx, JOINT)
  batch = _batch(synthetic_tokens(), 0)
  first = None
  for i in range(20):
    state, m = step(state, batch, jax.random.key(i))
    first = first or {k: float(v) for k, v in m.items()}
  for key in ("train/task", "train/rec", "train/kd", "train/value", "train/struct", "train/lb",
              "train/z", "train/loss", "train/grad_norm"):
    assert key in m and np.isfinite(float(m[key])), key
  assert float(m["train/loss"]) < first["train/loss"]
  # The teacher is frozen: it never moves.
  _, _, _, fresh = make_states(qat=True)
  for a, b in zip(jax.tree.leaves(state.teacher_params), jax.tree.leaves(fresh.teacher_params)):
    np.testing.assert_array_equal(a, b)


def test_new_allocation_reuses_the_compiled_step():
  cfg, model, tx, state = make_states(qat=True)
  step = jit_train_step(model, tx, JOINT)
  batch = _batch(synthetic_tokens(), 0)
  state, m_ternary = step(state, batch, jax.random.key(0))
  assert step._cache_size() == 1
  codes = np.array([[8, 4, 2, 1], [1, 2, 3, 4]])
  state = with_quant(state, set_expert_codes(state.quant, codes))
  state, m_mixed = step(state, batch, jax.random.key(1))
  assert step._cache_size() == 1, "changing the bit allocation recompiled the train step"
  np.testing.assert_array_equal(expert_codes(state.quant, cfg.num_layers), codes)
  assert float(m_mixed["train/rec"]) != float(m_ternary["train/rec"])


def test_router_stats_match_offline_computation():
  cfg, model, tx, state = make_states(qat=True)
  weights = JOINT
  step = jit_train_step(model, tx, weights)
  tokens = synthetic_tokens()
  start_norms = np.asarray(router_row_norms(state.params, cfg.num_layers))
  from moeqjax.train.step import _loss_fn
  grad_fn = jax.jit(jax.grad(lambda p, s, b: _loss_fn(p, s, b[:, :-1], b[:, 1:], model, weights),
                             has_aux=True))
  grad_sum = np.zeros_like(start_norms)
  counts = np.zeros_like(start_norms)
  gate_sum = np.zeros_like(start_norms)
  for i in range(3):
    batch = _batch(tokens, i)
    grads, (_, aux) = grad_fn(state.params, state, batch)
    kernels = np.stack([np.asarray(grads[f"layers_{l}"]["moe"]["router"]["kernel"])
                        for l in range(cfg.num_layers)])
    grad_sum += np.linalg.norm(kernels, axis=1)
    idx, gates = np.asarray(aux["expert_idx"]), np.asarray(aux["gates"])
    for l in range(cfg.num_layers):
      for e in range(cfg.num_experts):
        counts[l, e] += np.sum(idx[l] == e)
        gate_sum[l, e] += np.sum(np.where(idx[l] == e, gates[l], 0.0))
    state, _ = step(state, batch, jax.random.key(i))
  stats = jax.device_get(state.stats)
  np.testing.assert_allclose(stats["router_norm_start"], start_norms, rtol=1e-6)
  np.testing.assert_allclose(stats["grad_norm_sum"], grad_sum, rtol=1e-4)
  np.testing.assert_allclose(stats["count"], counts)
  np.testing.assert_allclose(stats["gate_sum"], gate_sum, rtol=1e-5)
  assert int(stats["steps"]) == 3
  assert counts.sum() == 3 * 4 * 16 * cfg.top_k * cfg.num_layers
