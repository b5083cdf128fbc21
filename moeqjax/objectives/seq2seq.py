"""The joint QAT objective of an encoder-decoder (Switch): decoder CE, reconstruction, KD, routing alignment."""

# Dims: B batch, T decoder positions, V vocab, E experts, L a stack's sparse layers; a stack's
# routing tensors are [L, B*len, ...] (model.AUX_KEYS). Terms that average over sparse layers
# (rec, value, struct) average over every sparse layer of both stacks, each layer counting once;
# lb and z are Switch's own router losses (model.routing.switch_router_losses) summed over the
# two stacks, as Hugging Face's SwitchTransformersForConditionalGeneration adds them, so the
# weights lb and z are its router_aux_loss_coef and router_z_loss_coef.
#
# Padding: every term counts real tokens only, the encoder's by the batch's encoder_mask and the
# decoder's by target_mask (a padded position's routing and block output never reach a real
# token's output: attention masks it, and right padding ranks last for the expert capacity), so a
# padded example scores as it does alone. transformers' Switch losses count padded tokens in lb
# and z; on unpadded batches (span corruption) the two agree.

from __future__ import annotations

import jax.numpy as jnp

from moeqjax.model.routing import switch_router_losses
from moeqjax.objectives.distill import block_reconstruction, kl_divergence
from moeqjax.objectives.joint import LossWeights
from moeqjax.objectives.lm import token_nll
from moeqjax.objectives.routing_align import structure_alignment, value_alignment

STACKS = ("encoder", "decoder")


def masked_mean(values_BxT, mask_BxT):
  """The mean of values over the positions where mask is True (0 when none is)."""
  mask = mask_BxT.astype(jnp.float32)
  return jnp.sum(values_BxT.astype(jnp.float32) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _flat(mask_BxS):
  """A [B, len] token mask in the routing tensors' [B*len] order (None stays None)."""
  return None if mask_BxS is None else mask_BxS.reshape(-1)


def _layer_mean(fn, aux, teacher_aux, key, masks):
  """fn(teacher [L, ...], student [L, ...], the stack's token mask [B, len]) averaged over the
  sparse layers of both stacks."""
  total, layers = 0.0, 0
  for stack in STACKS:
    n = aux[stack][key].shape[0]
    total = total + n * fn(teacher_aux[stack][key], aux[stack][key], masks[stack])
    layers += n
  return total / layers


def seq2seq_loss_terms(weights: LossWeights, batch_size: int, logits_BxTxV, aux, targets_BxT,
                       target_mask_BxT, teacher_logits_BxTxV=None, teacher_aux=None,
                       encoder_mask_BxS=None) -> dict:
  """Every term of the encoder-decoder objective, unweighted (names as in LossWeights).

  Args:
    weights: which teacher terms to compute (a zero weight skips one) and their hyper-parameters.
    batch_size: B (the router losses regroup the [L, B*len, E] logits by sequence).
    logits_BxTxV: the student decoder's logits.
    aux: {"encoder": aux, "decoder": aux}, the student's routing (SwitchTransformer's aux).
    targets_BxT: the decoder's target tokens; target_mask_BxT: False where no loss is taken.
    teacher_logits_BxTxV, teacher_aux: the frozen teacher's outputs, or None.
    encoder_mask_BxS: bool, False at source padding (those tokens count in no term); None: no
      padding.

  Returns:
    {name: scalar}: task (decoder CE in nats per target token), lb and z and, with a teacher, rec
    (block-output MSE), kd (final-logit KL on target tokens), value and struct (top-1 boundary).
  """
  masks = {"encoder": encoder_mask_BxS, "decoder": target_mask_BxT}
  z_loss, lb_loss = 0.0, 0.0
  for stack in STACKS:
    logits_LxMxE = aux[stack]["router_logits"]
    num_layers, m, e = logits_LxMxE.shape
    z, lb = switch_router_losses(logits_LxMxE.reshape(num_layers, batch_size, m // batch_size, e),
                                 masks[stack])
    z_loss, lb_loss = z_loss + z, lb_loss + lb
  terms = {"task": masked_mean(token_nll(logits_BxTxV, targets_BxT), target_mask_BxT),
           "lb": lb_loss, "z": z_loss}
  if teacher_logits_BxTxV is None:
    return terms
  if weights.rec:
    terms["rec"] = _layer_mean(lambda t, s, w: block_reconstruction(s, t, w), aux, teacher_aux,
                               "moe_out", masks)
  if weights.kd:
    kl_BxT = kl_divergence(teacher_logits_BxTxV, logits_BxTxV, weights.kd_temperature)
    terms["kd"] = masked_mean(kl_BxT, target_mask_BxT) * weights.kd_temperature ** 2
  if weights.value:
    terms["value"] = _layer_mean(
        lambda t, s, w: value_alignment(t, s, weights.value_temperature, _flat(w)), aux,
        teacher_aux, "router_logits", masks)
  if weights.struct:
    terms["struct"] = _layer_mean(
        lambda t, s, w: structure_alignment(t, s, 1, weights.struct_margin,
                                            weights.struct_rank_weight, _flat(w)),
        aux, teacher_aux, "router_logits", masks)
  return terms
