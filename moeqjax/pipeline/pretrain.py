"""`moeqjax pretrain`: trains the full-precision model (the teacher) into a workdir, reusing a finished run."""

from __future__ import annotations

import pathlib

import jax

from moeqjax.data import TokenCorpus
from moeqjax.model import init_model, without_ratios
from moeqjax.objectives import LossWeights
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.workdirs import finished_state, record_config
from moeqjax.train import TrainState, create_state, jit_train_step, make_optimizer, run_training


def pretrain(config, workdir: str | pathlib.Path, corpus: TokenCorpus, *,
             resume: bool) -> TrainState:
  """Trains the full-precision model (the teacher); reuses a finished run in `workdir`."""
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.pretrain, "pretrain")
  record_config(workdir, {k: config[k].to_dict() for k in ("model", "data", "pretrain")})
  model, params, _ = init_model(cfg, jax.random.key(loop.seed))
  params = without_ratios(params)  # a full-precision model has no learned scale ratios
  tx = make_optimizer(optim)
  state = create_state(params, tx, cfg.num_layers)
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  step_fn = jit_train_step(model, tx, LossWeights(rec=0, kd=0, value=0, struct=0,
                                                  lb=config.loss.lb, z=config.loss.z))
  return run_training(state, step_fn, corpus.train, loop, workdir, resume=resume,
                      desc="pretrain")
