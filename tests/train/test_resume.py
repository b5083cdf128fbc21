"""Checkpoint save -> kill -> resume equals an uninterrupted run; non-finite loss keeps the last checkpoint."""

import functools
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers_train import JOINT, make_states, synthetic_tokens
from moeqjax.train import (Checkpointer, CheckpointExists, Interrupted, LoopConfig, NonFiniteLoss,
                           jit_train_step, run_training)
from moeqjax.train.loop import _SignalFlag
from moeqjax.train.metrics_log import read_metrics

LOOP = LoopConfig(steps=6, batch_size=4, seq_len=16, seed=0, log_every=1, ckpt_every=2)


@functools.cache
def _step_fn():
  # One jitted step for every run of the module: its cache size then also shows that no run
  # (fresh, interrupted or resumed) compiled the step a second time.
  _, model, tx, _ = make_states(qat=True, steps=LOOP.steps)
  return jit_train_step(model, tx, JOINT)


def _run(workdir, resume, on_step=None, compiled=None):
  state = make_states(qat=True, steps=LOOP.steps)[3]
  step_fn = _step_fn()
  final = run_training(state, step_fn, synthetic_tokens(), LOOP, workdir, resume=resume,
                       desc="test", on_step=on_step)
  if compiled is not None:
    compiled.append(step_fn._cache_size())
  return final


@pytest.fixture(scope="module")
def killed_save(tmp_path_factory):
  """killed_save_child.py in the background from the module's first test on: (process, workdir)."""
  workdir = tmp_path_factory.mktemp("killed_save")
  here = pathlib.Path(__file__).parent
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(here), str(here.parent), str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
  child = subprocess.Popen([sys.executable, str(here / "killed_save_child.py"), str(workdir)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  yield child, workdir
  if child.poll() is None:
    child.kill()
  child.communicate()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, killed_save):
  """(final state, metrics log) of the run without interruption, shared by the resume tests
  (it starts the killed-save child first, which then runs beside it)."""
  workdir = tmp_path_factory.mktemp("full")
  final = _run(workdir, resume=False)
  return final, read_metrics(workdir / "metrics.jsonl")


def _assert_matches(uninterrupted, resumed, workdir):
  full, full_log = uninterrupted
  resumed_log = read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in resumed_log] == [1, 2, 3, 4, 5, 6]
  for a, b in zip(full_log, resumed_log):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  np.testing.assert_allclose(full.stats["grad_norm_sum"], resumed.stats["grad_norm_sum"], rtol=1e-6)


def test_sigterm_then_resume_matches_uninterrupted(tmp_path, uninterrupted):

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
  _assert_matches(uninterrupted, resumed, tmp_path / "killed")


def test_save_killed_before_its_commit_is_never_restored(killed_save, uninterrupted):
  """A process SIGKILLed inside orbax's save of step 4 (killed_save_child.py) leaves the step's
  files complete but uncommitted; resume takes step 2 and lands on the uninterrupted run.

  What decides: on a local (POSIX) file system orbax's CheckpointManager writes a step into
  `<step>.orbax-checkpoint-tmp` and commits it by renaming that folder to `<step>`
  (AtomicRenameTemporaryPath; the commit_success.txt it also writes there is what decides only
  with CommitFileTemporaryPath, orbax's default on GCS). latest_step() lists only folders whose
  name is a step, so the unrenamed folder is not a checkpoint, and the next save of step 4
  replaces it.
  """
  child, workdir = killed_save
  _, err = child.communicate(timeout=300)
  assert child.returncode == -signal.SIGKILL, err[-3000:]
  ckpt = workdir / "ckpt"
  uncommitted = ckpt / "4.orbax-checkpoint-tmp"
  assert sorted(p.name for p in ckpt.iterdir()) == ["2", uncommitted.name]
  # Everything but the commit was written: the state's arrays and orbax's step metadata.
  assert (uncommitted / "_CHECKPOINT_METADATA").is_file()
  written = [p.name for p in uncommitted.rglob("*")]
  assert "manifest.ocdbt" in written, written
  assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [1, 2, 3, 4]
  reader = Checkpointer(ckpt, 0)
  assert reader.latest_step() == 2
  reader.close()

  resumed = _run(workdir, resume=True)
  _assert_matches(uninterrupted, resumed, workdir)
  assert sorted(p.name for p in ckpt.iterdir()) == ["4", "6"]  # step 4 saved anew, committed


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


def test_ctrl_c_stops_like_sigterm_in_one_process():
  """One process: SIGINT sets the same flag as SIGTERM (the checkpoint-and-stop path above)."""
  with _SignalFlag() as flag:
    signal.raise_signal(signal.SIGINT)
  assert flag.received == "SIGINT"


def test_ctrl_c_of_one_host_becomes_its_preemption_notice(monkeypatch):
  """Several processes: SIGINT is passed on as this process's SIGTERM (jaxlib's preemption
  handler takes it there; see tests/train/test_multiprocess.py), once: a second Ctrl-C gets the
  handler that was there before, KeyboardInterrupt."""
  sent = []
  monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
  # "The handler that was there before" is Python's default here, whatever an earlier test in this
  # worker process left installed.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _second_ctrl_c_raises(sent)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert sent == [(os.getpid(), signal.SIGTERM)]


def _second_ctrl_c_raises(sent):
  with _SignalFlag(multi_process=True) as flag:
    signal.raise_signal(signal.SIGINT)
    assert sent == [(os.getpid(), signal.SIGTERM)] and flag.received is None
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)


def test_partial_restore_reads_only_the_parts_asked_for(tmp_path):
  """parts=("params", "quant"): those (and the step) equal a whole restore, into a shape-only
  template; the optimizer state, teacher and statistics come back None. Unknown parts: an error."""
  state = make_states(qat=True, steps=LOOP.steps)[3]
  state = state.replace(step=state.step + 3, params=jax.tree.map(lambda x: x * 1.5, state.params))
  ckpt = Checkpointer(tmp_path / "ckpt", every=0)
  try:
    ckpt.save(state, force=True)
    template = jax.eval_shape(lambda: state)
    whole = ckpt.restore(template)
    part = ckpt.restore(template, parts=("params", "quant"))
    with pytest.raises(ValueError, match=r"no \['optimizer'\] in this state; it has"):
      ckpt.restore(template, parts=("optimizer",))
  finally:
    ckpt.close()
  assert int(part.step) == int(whole.step) == 3
  assert part.opt_state is None and part.teacher_params is None and part.stats is None
  assert whole.opt_state is not None and whole.teacher_params is not None
  for name in ("params", "quant"):
    got, want = jax.tree.leaves(getattr(part, name)), jax.tree.leaves(getattr(state, name))
    assert jax.tree.structure(getattr(part, name)) == jax.tree.structure(getattr(state, name))
    assert len(got) == len(want) > 0
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
