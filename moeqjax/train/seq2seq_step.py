"""The jitted QAT / full-precision train step of an encoder-decoder (Switch Transformer) on seq2seq batches."""

# A batch is a dict of int32 arrays (data.Seq2SeqBatch's fields): encoder_ids [B, S],
# decoder_ids [B, T], targets [B, T], target_mask [B, T] (bool) and encoder_mask [B, S] (bool, False
# at the source's padding: encoder self-attention and decoder cross-attention skip it). Padding is
# still routed, as transformers' Switch routes it; it sits after a source's tokens, so the
# capacity (earlier tokens first) never drops a real token for it. The objective, the router
# statistics and the drop rate count real tokens only: the encoder's where encoder_mask is True,
# the decoder's where target_mask is (a position past the target predicts nothing). The state is
# the decoder-only
# step's TrainState: params, optimizer state, the student's `quant` codes (None: full precision),
# the frozen teacher's params (None: no teacher terms) and the router statistics over every
# sparse layer (encoder's, then decoder's; model.moe_paths).

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from moeqjax.model import SwitchTransformer
from moeqjax.model.capacity import real_token_drop_rate
from moeqjax.objectives import LossWeights, seq2seq_loss_terms, total_loss
from moeqjax.objectives.seq2seq import STACKS
from moeqjax.train.mesh import traced_in_mesh
from moeqjax.train.optim import apply_gradients
from moeqjax.train.step import step_metrics
from moeqjax.train.router_stats import update_router_stats
from moeqjax.train.state import TrainState

BATCH_KEYS = ("encoder_ids", "decoder_ids", "targets", "target_mask", "encoder_mask")


def batch_arrays(batch) -> dict:
  """A data.Seq2SeqBatch (or a dict with its fields) as the step's dict of arrays; a missing or
  None encoder_mask is all True (no padding), so every batch has one structure."""
  fields = dataclasses.asdict(batch) if dataclasses.is_dataclass(batch) else dict(batch)
  if fields.get("encoder_mask") is None:
    fields["encoder_mask"] = np.ones(np.shape(fields["encoder_ids"]), bool)
  return {key: jnp.asarray(fields[key]) for key in BATCH_KEYS}


def seq2seq_forward(model: SwitchTransformer, variables, batch, train: bool = False, rng=None):
  """(logits [B, T, V], aux) of a batch; train=True draws the router jitter from rng."""
  rngs = {"jitter": rng} if train and model.cfg.router_jitter > 0 else None
  return model.apply(variables, batch["encoder_ids"], batch["decoder_ids"],
                     batch.get("encoder_mask"), train=train, rngs=rngs)


def seq2seq_losses(params, state: TrainState, batch, rng, model: SwitchTransformer,
                   weights: LossWeights):
  """(total loss, (terms, student aux)) of the student `params` on a batch.

  The student runs with the state's codes (and the router jitter when its config has one); the
  teacher runs in full precision without jitter, under stop_gradient.
  """
  variables = {"params": params}
  if state.quant is not None:
    variables["quant"] = state.quant
  logits, aux = seq2seq_forward(model, variables, batch, train=True, rng=rng)
  teacher_logits = teacher_aux = None
  if state.teacher_params is not None and weights.needs_teacher:
    teacher = jax.lax.stop_gradient(state.teacher_params)
    teacher_logits, teacher_aux = seq2seq_forward(model, {"params": teacher}, batch)
  terms = seq2seq_loss_terms(weights, batch["targets"].shape[0], logits, aux, batch["targets"],
                             batch["target_mask"], teacher_logits, teacher_aux,
                             batch.get("encoder_mask"))
  return total_loss(weights, terms), (terms, aux)


def token_masks(batch) -> dict:
  """Each stack's real tokens, bool [B, len]: the encoder's by encoder_mask (all True when the
  batch has none), the decoder's by target_mask (a position past the target predicts nothing)."""
  encoder = batch.get("encoder_mask")
  if encoder is None:
    encoder = jnp.ones(batch["encoder_ids"].shape, bool)
  return {"encoder": encoder, "decoder": batch["target_mask"]}


def _pooled_drop_rate(model: SwitchTransformer, aux, masks):
  """The share of real routed tokens (every sparse layer of both stacks) the capacity dropped;
  padding is left out of the count (it ranks last in its row, so it never displaces a real
  token)."""
  moe = model.cfg.moe_config()
  dropped, routed = 0.0, 0.0
  for stack in STACKS:
    mask = masks[stack]
    num_layers = aux[stack]["expert_idx"].shape[0]
    rate_L = real_token_drop_rate(aux[stack]["expert_idx"], mask, moe.num_experts,
                                  capacity_factor=moe.capacity_factor,
                                  capacity=moe.expert_capacity)
    real = jnp.sum(mask.astype(jnp.float32))
    dropped = dropped + jnp.sum(rate_L) * real
    routed = routed + num_layers * real
  return dropped / jnp.maximum(routed, 1.0)


def seq2seq_train_step(state: TrainState, batch, rng, *, model: SwitchTransformer,
                       tx: optax.GradientTransformation, weights: LossWeights,
                       collect_stats: bool = True):
  """One optimizer step: (state, batch dict, rng) -> (state, metrics).

  rng feeds the router jitter (model.cfg.router_jitter > 0); fold the step into it per step.
  Router statistics take the student's routing of every sparse layer (encoder then decoder; real
  tokens only, token_masks) and the routers' gradients, as the decoder-only step does.
  """
  grad_fn = jax.value_and_grad(seq2seq_losses, has_aux=True)
  (loss, (terms, aux)), grads = grad_fn(state.params, state, batch, rng, model, weights)
  params, opt_state = apply_gradients(state.params, grads, state.opt_state, tx,
                                      model.cfg.quant.spec())
  stats = state.stats
  masks = token_masks(batch)
  if collect_stats:
    stats = update_router_stats(stats, grads, tuple(aux[s]["expert_idx"] for s in STACKS),
                                tuple(aux[s]["gates"] for s in STACKS),
                                token_masks=tuple(masks[s].reshape(-1) for s in STACKS))
  metrics = step_metrics(loss, grads, terms)
  if model.cfg.expert_capacity:
    metrics["train/drop_rate"] = _pooled_drop_rate(model, aux, masks)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
  return new_state, metrics


def jit_seq2seq_step(model: SwitchTransformer, tx: optax.GradientTransformation,
                     weights: LossWeights, collect_stats: bool = True, placement=None):
  """seq2seq_train_step compiled once for this model/optimizer/objective, with the state donated.

  The `quant` codes are data, so a new allocation (train.with_quant) reuses the compiled step.
  With a `placement` (moeqjax.train.sharding.Placement) the step is compiled for its mesh as the
  decoder-only jit_train_step is: the state keeps its shardings, every array of the batch dict
  comes split by rows, the metrics come back replicated, and GSPMD inserts the collectives.
  """
  fn = functools.partial(seq2seq_train_step, model=model, tx=tx, weights=weights,
                         collect_stats=collect_stats)
  if placement is None:
    return jax.jit(fn, donate_argnums=0)
  rep = NamedSharding(placement.mesh, PartitionSpec())
  return jax.jit(traced_in_mesh(fn, placement.mesh),
                 in_shardings=(placement.state, placement.batch, rep),
                 out_shardings=(placement.state, rep), donate_argnums=0)
