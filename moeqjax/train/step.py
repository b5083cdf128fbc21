"""The one jitted train step, used for full-precision training and for QAT alike."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from moeqjax.model import MoETransformer, forward_with_aux
from moeqjax.objectives import LossWeights, loss_terms, total_loss
from moeqjax.train.mesh import traced_in_mesh
from moeqjax.train.optim import apply_gradients
from moeqjax.train.router_stats import update_router_stats
from moeqjax.train.state import TrainState


def _loss_fn(params, state: TrainState, inputs, targets, model: MoETransformer,
             weights: LossWeights):
  variables = {"params": params}
  if state.quant is not None:
    variables["quant"] = state.quant
  logits, aux = forward_with_aux(model, variables, inputs)
  teacher_logits = teacher_aux = None
  if state.teacher_params is not None and weights.needs_teacher:
    teacher = jax.lax.stop_gradient(state.teacher_params)
    teacher_logits, teacher_aux = forward_with_aux(model, {"params": teacher}, inputs)
  terms = loss_terms(weights, model.cfg.top_k, logits, aux, targets, teacher_logits, teacher_aux)
  return total_loss(weights, terms), (terms, aux)


def train_step(state: TrainState, batch, rng, *, model: MoETransformer,
               tx: optax.GradientTransformation, weights: LossWeights, collect_stats: bool = True):
  """One optimizer step: (state, batch [B, S+1] int32, rng) -> (state, metrics).

  In QAT the student (params + quant codes) and the frozen teacher run in this same
  function; router statistics are updated from the gradients and routing already at hand.
  `rng` is unused by the current model (no dropout) but kept so that the signature is stable.
  `collect_stats=False` leaves the statistics untouched (only for benchmarks/stats_overhead.py).
  """
  del rng
  inputs, targets = batch[:, :-1], batch[:, 1:]
  grad_fn = jax.value_and_grad(_loss_fn, has_aux=True)
  (loss, (terms, aux)), grads = grad_fn(state.params, state, inputs, targets, model, weights)
  params, opt_state = apply_gradients(state.params, grads, state.opt_state, tx,
                                      model.cfg.quant.spec())
  stats = state.stats
  if collect_stats:
    stats = update_router_stats(stats, grads, aux["expert_idx"], aux["gates"],
                                model.cfg.num_layers)
  metrics = step_metrics(loss, grads, terms)
  if model.cfg.has_capacity:
    # Every layer routes the same T*k pairs, so the mean over layers is the pooled fraction.
    metrics["train/drop_rate"] = jnp.mean(aux["drop_rate"])
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, stats=stats)
  return new_state, metrics


def step_metrics(loss, grads, terms: dict) -> dict:
  """The metrics every train step logs: the loss, the gradient norm and each loss term."""
  return {"train/loss": loss, "train/grad_norm": optax.tree.norm(grads),
          **{f"train/{name}": value for name, value in terms.items()}}


def jit_train_step(model: MoETransformer, tx: optax.GradientTransformation,
                   weights: LossWeights, collect_stats: bool = True, placement=None):
  """train_step compiled once for this model/optimizer/objective, with the state donated.

  With a `placement` (moeqjax.train.sharding.Placement) the step is compiled for its mesh: the
  state keeps its shardings in and out, the batch comes split by rows and the metrics come back
  replicated; GSPMD inserts the collectives. The step is traced with the placement's mesh as the
  context mesh, so model.dispatch="ep" exchanges tokens over its expert axis (shard_map).
  """
  fn = functools.partial(train_step, model=model, tx=tx, weights=weights,
                         collect_stats=collect_stats)
  if placement is None:
    return jax.jit(fn, donate_argnums=0)
  rep = NamedSharding(placement.mesh, PartitionSpec())
  return jax.jit(traced_in_mesh(fn, placement.mesh), in_shardings=(placement.state, placement.batch, rep),
                 out_shardings=(placement.state, rep), donate_argnums=0)
