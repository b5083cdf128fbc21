"""Reconstruction against the frozen full-precision teacher: MoE block outputs and final logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def block_reconstruction(student_out_LxBxSxD: jax.Array, teacher_out_LxBxSxD: jax.Array,
                         token_mask_BxS=None):
  """MSE of each MoE block's output against the teacher's, averaged over layers (and over the
  tokens where token_mask_BxS is True, when given)."""
  diff = student_out_LxBxSxD.astype(jnp.float32) - teacher_out_LxBxSxD.astype(jnp.float32)
  if token_mask_BxS is None:
    return jnp.mean(jnp.square(diff))
  w_BxS = token_mask_BxS.astype(jnp.float32)
  per_token_LxBxS = jnp.mean(jnp.square(diff), axis=-1)
  return jnp.sum(per_token_LxBxS * w_BxS) / (diff.shape[0] * jnp.maximum(jnp.sum(w_BxS), 1.0))


def kl_divergence(teacher_logits, student_logits, temperature: float = 1.0, axis: int = -1):
  """KL(softmax(teacher/t) || softmax(student/t)) per row (same leading shape as the inputs)."""
  t_logp = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, axis=axis)
  s_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=axis)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=axis)


def logits_kd(teacher_logits_BxSxV, student_logits_BxSxV, temperature: float = 1.0):
  """Token-averaged KL on the final logits, scaled by t^2 so gradients keep their size."""
  return jnp.mean(kl_divergence(teacher_logits_BxSxV, student_logits_BxSxV, temperature)) * (
      temperature ** 2)
