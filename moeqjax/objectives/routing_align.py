"""Routing alignment of the quantized student to the teacher: value (KL) and structure (top-k hinge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moeqjax.objectives.distill import kl_divergence


def value_alignment(teacher_logits_LxTxE, student_logits_LxTxE, temperature: float = 1.0):
  """L_value = KL(softmax(z/t) || softmax(z_hat/t)), averaged over tokens and layers."""
  return jnp.mean(kl_divergence(jax.lax.stop_gradient(teacher_logits_LxTxE),
                                student_logits_LxTxE, temperature))


def structure_alignment(teacher_logits_LxTxE, student_logits_LxTxE, top_k: int, margin: float,
                        rank_weight: float = 0.0):
  """Hinge on the teacher's top-k decision boundary, applied to the student's logits.

  L_struct = mean_{i in T_k, j not in T_k} relu(m - (z_hat_i - z_hat_j)), with T_k the
  teacher's top-k set. With rank_weight > 0, adds the same hinge over consecutive pairs
  inside T_k in the teacher's order, so the student keeps the order of the chosen experts
  (which sets their gates) as well as the set.

  Args:
    teacher_logits_LxTxE: teacher router logits (no gradient flows into them).
    student_logits_LxTxE: student router logits.
    top_k: k of the routing.
    margin: m, the logit gap the student must keep across the boundary.
    rank_weight: weight of the in-set ranking term.

  Returns:
    A scalar loss.
  """
  teacher = jax.lax.stop_gradient(teacher_logits_LxTxE.astype(jnp.float32))
  student = student_logits_LxTxE.astype(jnp.float32)
  num_experts = teacher.shape[-1]
  _, top_idx = jax.lax.top_k(teacher, top_k)  # [L, T, K], sorted by teacher logit
  in_set = jnp.sum(jax.nn.one_hot(top_idx, num_experts, dtype=jnp.float32), axis=-2)  # [L,T,E]
  chosen = jnp.take_along_axis(student, top_idx, axis=-1)  # z_hat_i, [L, T, K]
  gaps = chosen[..., :, None] - student[..., None, :]  # z_hat_i - z_hat_j, [L, T, K, E]
  hinge = jax.nn.relu(margin - gaps) * (1.0 - in_set)[..., None, :]
  num_pairs = top_k * (num_experts - top_k)
  loss = jnp.sum(hinge) / (hinge.shape[0] * hinge.shape[1] * max(num_pairs, 1))
  if rank_weight and top_k > 1:
    rank = jax.nn.relu(margin - (chosen[..., :-1] - chosen[..., 1:]))
    loss = loss + rank_weight * jnp.mean(rank)
  return loss
