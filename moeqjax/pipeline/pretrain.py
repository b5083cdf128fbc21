"""`moeqjax pretrain`: trains the full-precision model (the teacher) into a workdir, reusing a finished run."""

from __future__ import annotations

import pathlib

import jax

from moeqjax.data import TokenCorpus
from moeqjax.model import MoETransformer, init_model, without_ratios
from moeqjax.objectives import LossWeights
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.mesh import run_placement
from moeqjax.pipeline.workdirs import finished_state, record_config
from moeqjax.train import TrainState, create_state, jit_train_step, make_optimizer, run_training
from moeqjax.train.sharding import init_sharded


def pretrain(config, workdir: str | pathlib.Path, corpus: TokenCorpus, *,
             resume: bool) -> TrainState:
  """Trains the full-precision model (the teacher); reuses a finished run in `workdir`.

  A Switch config (config_io.is_switch) pretrains on span corruption (switch_phases.pretrain).
  """
  if config_io.is_switch(config):
    from moeqjax.pipeline import switch_phases
    return switch_phases.pretrain(config, workdir, corpus, resume=resume)
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.pretrain, "pretrain")
  record_config(workdir, {k: config[k].to_dict() for k in ("model", "data", "pretrain")})
  tx = make_optimizer(optim)

  def build(rng):
    # A full-precision model has no learned scale ratios.
    return create_state(without_ratios(init_model(cfg, rng)[1]), tx, cfg.num_layers)

  rng = jax.random.key(loop.seed)
  place = run_placement(config, jax.eval_shape(build, rng), loop.batch_size)
  # On a mesh every leaf is initialised in its own shards (nothing whole on one device).
  state = build(rng) if place is None else init_sharded(build, place.state, rng)
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  step_fn = jit_train_step(MoETransformer(cfg), tx, LossWeights(
      rec=0, kd=0, value=0, struct=0, lb=config.loss.lb, z=config.loss.z), placement=place)
  return run_training(state, step_fn, corpus.train, loop, workdir, resume=resume,
                      desc="pretrain", placement=place)
