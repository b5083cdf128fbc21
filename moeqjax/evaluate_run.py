"""`moeqjax eval`: a finished QAT run against its full-precision teacher on held-out data."""

from __future__ import annotations

import json
import pathlib

import jax

from moeqjax import config_io, runs
from moeqjax.data import eval_windows
from moeqjax.eval import evaluate_variants
from moeqjax.model import init_model
from moeqjax.train import create_state, make_optimizer


class UnfinishedRun(config_io.ConfigError):
  pass


def restore_qat_state(config, workdir: pathlib.Path):
  """The final state of a finished QAT run in `workdir` (no params are initialised)."""
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.qat, "qat")
  tx = make_optimizer(optim)

  def build():
    params = init_model(cfg, jax.random.key(0))[1]
    return create_state(params, tx, cfg.num_layers, quant=runs.default_quant(cfg),
                        teacher_params=params)

  state = runs.finished_state(workdir, jax.eval_shape(build), loop.steps)
  if state is None:
    raise UnfinishedRun(f"{workdir} holds no finished QAT run of {loop.steps} steps; finish it "
                        f"with `moeqjax qat --workdir {workdir} --resume ...`")
  return state


def evaluate_qat_run(config, workdir: pathlib.Path, teacher_params) -> dict:
  """Evaluates teacher and student; writes workdir/eval.json and returns the metrics."""
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  state = restore_qat_state(config, workdir)
  corpus = runs.load_data(config)
  windows = eval_windows(corpus.valid, config.eval.seq_len, config.eval.num_windows)
  results = evaluate_variants(cfg, {
      "full_precision": {"params": teacher_params},
      "student": {"params": state.params, "quant": state.quant},
  }, windows, config.eval.batch_size)
  (workdir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
  return results
