"""The joint QAT objective: task CE + reconstruction + logits KD + routing value and structure alignment."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from moeqjax.objectives.distill import block_reconstruction, logits_kd
from moeqjax.objectives.lm import cross_entropy
from moeqjax.objectives.routing_align import structure_alignment, value_alignment


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """Weights of every term; a zero weight skips the term's computation."""

  task: float = 1.0  # next-token cross-entropy
  rec: float = 0.0  # MSE of each MoE block output vs the teacher
  kd: float = 0.0  # KL of the final logits vs the teacher
  value: float = 0.0  # routing value alignment (KL of router distributions)
  struct: float = 0.0  # routing structure alignment (top-k boundary hinge)
  lb: float = 0.01  # Switch balance loss, 1/k of HF's scale (model.routing.load_balance_loss)
  z: float = 0.001  # router z-loss
  kd_temperature: float = 1.0
  value_temperature: float = 1.0
  struct_margin: float = 0.5
  struct_rank_weight: float = 0.0

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if getattr(self, f.name) < 0:
        raise ValueError(f"loss.{f.name}={getattr(self, f.name)} must be >= 0")
    for name in ("kd_temperature", "value_temperature"):
      if getattr(self, name) <= 0:
        raise ValueError(f"loss.{name} must be > 0")

  @property
  def needs_teacher(self) -> bool:
    return any((self.rec, self.kd, self.value, self.struct))


def loss_terms(weights: LossWeights, top_k: int, logits, aux, targets, teacher_logits=None,
               teacher_aux=None) -> dict:
  """Every term of the objective, unweighted. Teacher terms need teacher outputs.

  Args:
    weights: which terms to compute (a zero weight skips it) and their hyper-parameters.
    top_k: the model's routing k (for the structure hinge).
    logits: student logits [B, S, V].
    aux: student routing tensors (moeqjax.model.AUX_KEYS), stacked over layers.
    targets: next tokens [B, S].
    teacher_logits: teacher logits [B, S, V] or None.
    teacher_aux: teacher routing tensors or None.

  Returns:
    {name: scalar} for task, lb, z and, with a teacher, rec, kd, value, struct.
  """
  terms = {
      "task": cross_entropy(logits, targets),
      "lb": jnp.mean(aux["lb_loss"]),
      "z": jnp.mean(aux["z_loss"]),
  }
  if teacher_logits is None:
    return terms
  if weights.rec:
    terms["rec"] = block_reconstruction(aux["moe_out"], teacher_aux["moe_out"])
  if weights.kd:
    terms["kd"] = logits_kd(teacher_logits, logits, weights.kd_temperature)
  if weights.value:
    terms["value"] = value_alignment(teacher_aux["router_logits"], aux["router_logits"],
                                     weights.value_temperature)
  if weights.struct:
    terms["struct"] = structure_alignment(teacher_aux["router_logits"], aux["router_logits"],
                                          top_k, weights.struct_margin,
                                          weights.struct_rank_weight)
  return terms


def total_loss(weights: LossWeights, terms: dict):
  """The weighted sum of the computed terms."""
  return sum(getattr(weights, name) * value for name, value in terms.items())
