"""Learned clip ratios and LSQ scales in QAT: kept in range by projection, always trainable, never decayed."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_model_config
from helpers_train import JOINT, synthetic_tokens
from moeqjax.model import default_quant
from moeqjax.data import sample_batch
from moeqjax.model import QuantRules, init_model, init_ratios, set_expert_codes, without_ratios
from moeqjax.quant import search_ratio
from moeqjax.train import OptimConfig, create_state, jit_train_step, make_optimizer
from moeqjax.train.step import _loss_fn  # pylint: disable=protected-access

CLIP_NAMES = ("w_in_clip", "w_gate_clip", "w_out_clip")


def _clip_leaves(tree, num_layers):
  return {(l, n): np.asarray(tree[f"layers_{l}"]["moe"][n]) for l in range(num_layers)
          for n in CLIP_NAMES}


def test_learned_clip_ratios_stay_in_range_and_keep_learning():
  """Issue 11 defect 1: a ratio that stepped above 1 sat in a hard clamp with zero gradient forever.

  After a short int4 QAT with a large learning rate (so that Adam pushes many ratios against the
  upper bound), every raw ratio is inside [0.05, 1] and every channel still gets a nonzero gradient.
  """
  cfg = tiny_model_config(quant=QuantRules(expert_code=4, learn_clip=True))
  model, params, _ = init_model(cfg, jax.random.key(0))
  tx = make_optimizer(OptimConfig(learning_rate=3e-2, warmup_steps=0, total_steps=20,
                                  end_lr_fraction=1.0, weight_decay=0.1, grad_clip=1.0))
  state = create_state(jax.tree.map(jnp.copy, params), tx, cfg.num_layers,
                       quant=default_quant(cfg), teacher_params=params)
  step = jit_train_step(model, tx, JOINT)
  tokens = synthetic_tokens()
  for i in range(20):
    state, _ = step(state, jnp.asarray(sample_batch(tokens, 8, 16, seed=0, step=i)),
                    jax.random.key(i))
  raw = _clip_leaves(state.params, cfg.num_layers)
  for key, r in raw.items():
    assert r.min() >= 0.05 and r.max() <= 1.0, f"{key} left [0.05, 1]: {r.min()} .. {r.max()}"
  # Some ratios sit exactly on the upper bound after projection: they must still be trainable.
  assert sum(int((r == 1.0).sum()) for r in raw.values()) > 0
  assert sum(int((r < 1.0).sum()) for r in raw.values()) > 0
  batch = jnp.asarray(sample_batch(tokens, 16, 16, seed=1, step=0))
  grads = jax.jit(jax.grad(  # compiled: op by op, the gradient costs seconds more
      lambda p: _loss_fn(p, state, batch[:, :-1], batch[:, 1:], model, JOINT)[0]))(state.params)
  for key, g in _clip_leaves(grads, cfg.num_layers).items():
    assert np.all(g != 0), f"{key}: {int((g == 0).sum())} of {g.size} ratios get no gradient"


def test_weight_decay_skips_clip_ratios():
  """Issue 11 defect 1: the decay mask (ndim >= 2) also decayed the [E, 1, F] clip ratios."""
  cfg = tiny_model_config(quant=QuantRules(expert_code=4, learn_clip=True))
  _, params, _ = init_model(cfg, jax.random.key(0))
  tx = make_optimizer(OptimConfig(learning_rate=0.1, warmup_steps=0, total_steps=10,
                                  end_lr_fraction=1.0, weight_decay=0.5, grad_clip=1.0))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  moe = updates["layers_0"]["moe"]
  for name in CLIP_NAMES:  # zero gradient and no decay: no update at all
    np.testing.assert_array_equal(np.asarray(moe[name]), 0.0, err_msg=name)
  # The expert matrices themselves are still decayed: update = -lr * wd * w.
  np.testing.assert_allclose(np.asarray(moe["w_in"]),
                             -0.1 * 0.5 * np.asarray(params["layers_0"]["moe"]["w_in"]),
                             rtol=1e-6)


def test_learned_scales_start_at_the_mse_ratio_move_and_lower_the_loss():
  """learn_scale with scale_init="mse": the QAT start sets every ratio to the searched one (ternary
  ratios above 1, outside a clip ratio's range), training moves them within [0.05, 4], and the
  loss on a held batch goes down."""
  rules = QuantRules(expert_code=1, learn_scale=True, scale_init="mse")
  cfg = tiny_model_config(quant=rules)
  model, params, _ = init_model(cfg, jax.random.key(0))
  quant = set_expert_codes(default_quant(cfg), [[1, 2, 1, 2], [2, 1, 3, 1]])
  teacher = without_ratios(params)
  student = init_ratios(cfg, jax.tree.map(jnp.copy, teacher), quant)
  start = _clip_leaves(student, cfg.num_layers)
  for (l, n), r in start.items():
    w = student[f"layers_{l}"]["moe"][n[:-5]]
    codes = np.asarray(quant[f"layers_{l}"]["moe"]["expert_bits"])
    np.testing.assert_array_equal(r, np.clip(np.asarray(search_ratio(w, codes, rules.spec())),
                                             0.05, 4.0))
  assert max(float(r[0].max()) for r in start.values()) > 1.0  # layer 0 expert 0 is ternary
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=0, total_steps=8,
                                  end_lr_fraction=1.0, weight_decay=0.1, grad_clip=1.0))
  state = create_state(student, tx, cfg.num_layers, quant=quant, teacher_params=teacher)
  tokens = synthetic_tokens()
  held = jnp.asarray(sample_batch(tokens, 16, 16, seed=1, step=0))
  loss_fn = jax.jit(lambda s: _loss_fn(s.params, s, held[:, :-1], held[:, 1:], model, JOINT)[0])
  held_loss = lambda s: float(loss_fn(s))
  before = held_loss(state)
  step = jit_train_step(model, tx, JOINT)
  for i in range(8):
    state, _ = step(state, jnp.asarray(sample_batch(tokens, 8, 16, seed=0, step=i)),
                    jax.random.key(i))
  assert held_loss(state) < before
  for key, r in _clip_leaves(state.params, cfg.num_layers).items():
    assert 0.05 <= r.min() and r.max() <= 4.0, key
    assert np.mean(r != start[key]) > 0.5, f"{key}: the learned scales did not move"
