"""Routing alignment of the quantized student to the teacher: value (KL) and structure (top-k hinge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moeqjax.objectives.distill import kl_divergence


def token_mean(values_LxT, token_mask_T=None):
  """The mean over layers and the tokens where token_mask_T is True (None: every token)."""
  if token_mask_T is None:
    return jnp.mean(values_LxT)
  w_T = token_mask_T.astype(jnp.float32)
  return jnp.sum(values_LxT * w_T) / (values_LxT.shape[0] * jnp.maximum(jnp.sum(w_T), 1.0))


def value_alignment(teacher_logits_LxTxE, student_logits_LxTxE, temperature: float = 1.0,
                    token_mask_T=None):
  """L_value = KL(softmax(z/t) || softmax(z_hat/t)), averaged over tokens (those where
  token_mask_T is True, when given) and layers."""
  return token_mean(kl_divergence(jax.lax.stop_gradient(teacher_logits_LxTxE),
                                  student_logits_LxTxE, temperature), token_mask_T)


def structure_alignment(teacher_logits_LxTxE, student_logits_LxTxE, top_k: int, margin: float,
                        rank_weight: float = 0.0, token_mask_T=None):
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
    token_mask_T: bool [T], the tokens to average over (e.g. not padding); None: all.

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
  if token_mask_T is None:  # the unmasked sums as they always were (golden metrics pin them)
    loss = jnp.sum(hinge) / (hinge.shape[0] * hinge.shape[1] * max(num_pairs, 1))
  else:
    loss = token_mean(jnp.sum(hinge, axis=(-2, -1)), token_mask_T) / max(num_pairs, 1)
  if rank_weight and top_k > 1:
    rank = jax.nn.relu(margin - (chosen[..., :-1] - chosen[..., 1:]))
    rank_mean = (jnp.mean(rank) if token_mask_T is None
                 else token_mean(jnp.mean(rank, axis=-1), token_mask_T))
    loss = loss + rank_weight * rank_mean
  return loss
