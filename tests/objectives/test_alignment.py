"""Reconstruction and routing alignment losses: zero at equality, positive otherwise, right gradients."""

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.objectives import (block_reconstruction, kl_divergence, logits_kd, structure_alignment,
                                value_alignment)


def _logits(seed, shape=(2, 5, 6)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_zero_when_student_equals_teacher():
  z = _logits(0)
  assert float(value_alignment(z, z)) < 1e-7
  assert float(logits_kd(z, z)) < 1e-7
  assert float(block_reconstruction(z, z)) == 0.0
  # with a margin of zero, identical logits are already across the boundary
  assert float(structure_alignment(z, z, top_k=2, margin=0.0)) == 0.0


def test_positive_when_different():
  z, zh = _logits(0), _logits(1)
  assert float(value_alignment(z, zh)) > 1e-3
  assert float(structure_alignment(z, zh, top_k=2, margin=0.5)) > 1e-3
  assert float(block_reconstruction(z, zh)) > 1e-3


def test_kl_matches_numpy():
  p, q = np.random.default_rng(2).normal(size=(2, 4, 5, 6))
  pp = np.exp(p) / np.exp(p).sum(-1, keepdims=True)
  qq = np.exp(q) / np.exp(q).sum(-1, keepdims=True)
  ref = np.sum(pp * np.log(pp / qq), -1)
  np.testing.assert_allclose(kl_divergence(jnp.asarray(p), jnp.asarray(q)), ref, rtol=1e-5)


def test_structure_hinge_matches_loop_oracle():
  z, zh = np.asarray(_logits(3, (1, 4, 5))), np.asarray(_logits(4, (1, 4, 5)))
  k, m = 2, 0.7
  total, n = 0.0, 0
  for t in range(4):
    top = set(np.argsort(-z[0, t])[:k].tolist())
    for i in top:
      for j in set(range(5)) - top:
        total += max(0.0, m - (zh[0, t, i] - zh[0, t, j]))
        n += 1
  np.testing.assert_allclose(structure_alignment(jnp.asarray(z), jnp.asarray(zh), k, m), total / n,
                             rtol=1e-5)


def test_structure_gradient_moves_student_toward_teacher_topk():
  teacher = jnp.asarray([[[3.0, 2.0, 0.0, -1.0]]])
  student = jnp.asarray([[[0.0, -1.0, 2.0, 1.0]]])  # top-2 is wrong: {2, 3}
  grad = jax.grad(lambda s: structure_alignment(teacher, s, top_k=2, margin=0.5))(student)
  step = student - 0.5 * grad
  # descending raises the teacher's experts and lowers the others
  assert float(grad[0, 0, 0]) < 0 and float(grad[0, 0, 1]) < 0
  assert float(grad[0, 0, 2]) > 0 and float(grad[0, 0, 3]) > 0
  for _ in range(40):
    step = step - 0.5 * jax.grad(lambda s: structure_alignment(teacher, s, 2, 0.5))(step)
  assert set(np.argsort(-np.asarray(step[0, 0]))[:2].tolist()) == {0, 1}
  assert float(structure_alignment(teacher, step, 2, 0.5)) == 0.0


def test_value_gradient_moves_student_toward_teacher_distribution():
  teacher, student = _logits(5, (1, 3, 4)), _logits(6, (1, 3, 4))
  before = float(value_alignment(teacher, student))
  for _ in range(50):
    student = student - 1.0 * jax.grad(lambda s: value_alignment(teacher, s))(student)
  assert float(value_alignment(teacher, student)) < 0.1 * before


def test_rank_term_keeps_order_inside_topk():
  teacher = jnp.asarray([[[3.0, 2.0, 0.0]]])
  swapped = jnp.asarray([[[2.0, 3.0, 0.0]]])  # same set, wrong order
  assert float(structure_alignment(teacher, swapped, 2, 0.5, rank_weight=0.0)) == 0.0
  assert float(structure_alignment(teacher, swapped, 2, 0.5, rank_weight=1.0)) > 1.0
