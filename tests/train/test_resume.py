"""Checkpoint save -> kill -> resume equals an uninterrupted run; non-finite loss keeps the last checkpoint."""

import os
import signal

import jax
import numpy as np
import pytest

from helpers_train import JOINT, make_states, synthetic_tokens
from moeqjax.train import (CheckpointExists, Interrupted, LoopConfig, NonFiniteLoss, jit_train_step,
                           run_training)
from moeqjax.train.metrics_log import read_metrics

LOOP = LoopConfig(steps=6, batch_size=4, seq_len=16, seed=0, log_every=1, ckpt_every=2)


def _run(workdir, resume, on_step=None, compiled=None):
  _, model, tx, state = make_states(qat=True, steps=LOOP.steps)
  step_fn = jit_train_step(model, tx, JOINT)
  final = run_training(state, step_fn, synthetic_tokens(), LOOP, workdir, resume=resume,
                       desc="test", on_step=on_step)
  if compiled is not None:
    compiled.append(step_fn._cache_size())
  return final


def test_sigterm_then_resume_matches_uninterrupted(tmp_path):
  full = _run(tmp_path / "full", resume=False)

  def kill_at_3(step, metrics):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)  # the handler turns it into a checkpoint + stop

  with pytest.raises(Interrupted, match="SIGTERM at step 3"):
    _run(tmp_path / "killed", resume=False, on_step=kill_at_3)
  with pytest.raises(CheckpointExists, match="--resume"):
    _run(tmp_path / "killed", resume=False)
  compiled = []
  resumed = _run(tmp_path / "killed", resume=True, compiled=compiled)
  # restored (committed) and fresh leaves must not make the step compile a second time
  assert compiled == [1]

  full_log = read_metrics(tmp_path / "full" / "metrics.jsonl")
  resumed_log = read_metrics(tmp_path / "killed" / "metrics.jsonl")
  assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(full_log, resumed_log):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(full.stats["grad_norm_sum"], resumed.stats["grad_norm_sum"], rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  _, model, tx, state = make_states(qat=False, steps=LOOP.steps)
  step = jit_train_step(model, tx, JOINT)

  def poisoned(state, batch, rng):
    new_state, metrics = step(state, batch, rng)
    if int(new_state.step) == 5:
      metrics = dict(metrics, **{"train/loss": np.float32(np.nan)})
    return new_state, metrics

  with pytest.raises(NonFiniteLoss, match=r"step 5.*checkpoint \(step 4\)"):
    run_training(state, poisoned, synthetic_tokens(), LOOP, tmp_path, resume=False, desc="nan")
  steps = sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit())
  assert steps[-1] == 4


def test_state_mixing_restored_and_fresh_leaves_compiles_once(tmp_path):
  """QAT from a restored teacher: committed (restored) params next to fresh optimizer leaves."""
  _, model, tx, state = make_states(qat=True, steps=LOOP.steps)
  committed = jax.device_put(state.teacher_params, jax.devices()[0])  # as orbax restores them
  state = state.replace(teacher_params=committed)
  step_fn = jit_train_step(model, tx, JOINT)
  loop = LoopConfig(steps=3, batch_size=4, seq_len=16, seed=0, log_every=1, ckpt_every=0)
  run_training(state, step_fn, synthetic_tokens(), loop, tmp_path, resume=False, desc="mixed")
  assert step_fn._cache_size() == 1
