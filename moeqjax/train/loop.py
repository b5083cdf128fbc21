"""The training loop: deterministic batches, progress bar, JSON-lines metrics, checkpoints, resume, signals."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import signal
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from moeqjax.data import sample_batch
from moeqjax.train.checkpoint import Checkpointer
from moeqjax.train.metrics_log import MetricsLog, to_python
from moeqjax.train.state import TrainState


class TrainingStopped(Exception):
  """A run ended early; the message says where its last checkpoint is."""


class NonFiniteLoss(TrainingStopped):
  pass


class Interrupted(TrainingStopped):
  pass


class CheckpointExists(TrainingStopped):
  pass


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log and checkpoint."""

  steps: int
  batch_size: int
  seq_len: int
  seed: int  # batches and rngs are functions of (seed, step), so a resumed run matches
  log_every: int
  ckpt_every: int  # 0 = only at the end (and on interrupt)

  def __post_init__(self):
    for name in ("steps", "batch_size", "seq_len", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


class _SignalFlag:
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step.

  With several processes a host must not stop on its own (it would wait forever for the others
  in the next collective or save): a SIGTERM on any host reaches JAX's preemption service
  (jax.distributed; jaxlib handles the signal), which agrees with every host on a step at which
  all of them save (see `_preempted`). A Ctrl-C (SIGINT) there is passed on as this process's own
  SIGTERM, so it stops every host cleanly the same way; a second Ctrl-C interrupts at once. With
  the preemption service turned off, SIGINT is left alone (KeyboardInterrupt, no save: a save it
  cuts short is never committed, so it is never restored).
  """

  def __init__(self, multi_process: bool = False):
    self.received = None
    self._old = {}
    if not multi_process:
      self._handlers = {signal.SIGINT: self._handle, signal.SIGTERM: self._handle}
    elif jax.config.jax_enable_preemption_service:
      self._handlers = {signal.SIGINT: self._forward}
    else:
      self._handlers = {}

  def __enter__(self):
    for sig, handler in self._handlers.items():
      try:
        self._old[sig] = signal.signal(sig, handler)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def _forward(self, signum, frame):
    del signum, frame
    signal.signal(signal.SIGINT, self._old.get(signal.SIGINT, signal.default_int_handler))
    os.kill(os.getpid(), signal.SIGTERM)

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)


def _preempted(step: int) -> str | None:
  """A reason to stop when the hosts of a multi-process run agreed to save at `step`."""
  # The service is on unless jax_enable_preemption_service was turned off (then no notices).
  if (jax.process_count() > 1 and jax.config.jax_enable_preemption_service
      and multihost_utils.reached_preemption_sync_point(step)):
    return "preemption notice (SIGTERM or Ctrl-C on a host)"
  return None


def commit_to_device(state: TrainState, placement=None) -> TrainState:
  """Commits every leaf to the default device (or its shardings on a mesh) before the first step.

  Orbax-restored leaves are committed to a device and freshly created ones are not; jit keys its
  cache on that, so a mixed state would compile the step twice (once more after step one).
  """
  if placement is not None:
    return placement.put_state(state)
  return jax.device_put(state, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def run_training(state: TrainState, step_fn: Callable, tokens: np.ndarray | None,
                 loop: LoopConfig, workdir: str | pathlib.Path, *, resume: bool, desc: str,
                 on_step: Callable[[int, dict], None] | None = None,
                 placement=None, batches: Callable[[int], object] | None = None) -> TrainState:
  """Runs `step_fn` from the state's step (or the latest checkpoint) to `loop.steps`.

  Args:
    state: the initial state (also the restore template).
    step_fn: jitted (state, batch, rng) -> (state, metrics).
    tokens: the training token stream, 1-D (None when `batches` is given).
    loop: step count, batch shape, seed, logging and checkpoint cadence.
    workdir: gets `ckpt/` and `metrics.jsonl`.
    resume: continue from the latest checkpoint in workdir; without it, an existing
      checkpoint is an error rather than silently overwritten.
    desc: progress bar label.
    on_step: called as on_step(step, metrics) after every step (tests, plots).
    placement: a moeqjax.train.sharding.Placement when the step runs on a mesh: the state keeps
      its shardings (a checkpoint is restored into them) and each batch is split by rows. With
      several processes (jax.distributed) each draws only its rows of the global batch, so
      `tokens` must be the whole train stream on every process; all save the checkpoints
      (orbax multi-host) and process 0 alone writes metrics.jsonl and the progress bar.
    batches: instead of windows of `tokens`, the batch of each step: batches(step) -> what
      step_fn takes (e.g. a seq2seq batch dict); it must be a pure function of the step, so that
      a resumed run sees the same batches. On a mesh every array of it is split by rows, and each
      process keeps its block of the global batch's rows.

  Returns:
    The final state (checkpointed).

  Raises:
    NonFiniteLoss: the loss became NaN/inf; the last good checkpoint is kept.
    Interrupted: SIGINT/SIGTERM arrived; a checkpoint of the current step was saved.
    CheckpointExists: a checkpoint exists and resume is False.
  """
  if (batches is None) == (tokens is None):
    raise ValueError("run_training takes either a token stream or a batches(step) function")
  workdir = pathlib.Path(workdir)
  ckpt = Checkpointer(workdir / "ckpt", loop.ckpt_every)
  latest = ckpt.latest_step()
  if latest is not None:
    if not resume:
      raise CheckpointExists(
          f"{workdir} already holds a checkpoint at step {latest}; pass --resume to continue it "
          "or choose another --workdir")
    state = ckpt.restore(state, latest)
  state = commit_to_device(state, placement)
  start = int(state.step)
  # Every process computes; process 0 alone writes metrics.jsonl and draws the progress bar.
  primary = jax.process_index() == 0
  log = MetricsLog(workdir / "metrics.jsonl", resume_step=start) if primary else None
  base_rng = jax.random.key(loop.seed)
  # This process's block of the global batch's rows: (0, 1) on one process.
  rows = (0, 1) if placement is None else placement.batch_rows(loop.batch_size)
  try:
    with _SignalFlag(jax.process_count() > 1) as flag, tqdm(total=loop.steps, initial=start, desc=desc,
                                     dynamic_ncols=True, leave=True, disable=not primary) as bar:
      for step in range(start, loop.steps):
        # The global batch is a function of (seed, step) alone, whatever the process count.
        if batches is not None:  # the global batch; this process keeps its block of rows
          batch = batches(step)
          if placement is not None:
            block = loop.batch_size // rows[1]
            batch = jax.tree.map(lambda a: a[rows[0] * block:(rows[0] + 1) * block], batch)
        else:
          batch = sample_batch(tokens, loop.batch_size, loop.seq_len, loop.seed, step, *rows)
        if placement is not None:
          batch = jax.tree.map(lambda a: placement.put_process_rows(a, loop.batch_size), batch)
        state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
        metrics = to_python(jax.device_get(metrics))
        loss = metrics["train/loss"]
        if not math.isfinite(loss):
          last = ckpt.latest_step()
          raise NonFiniteLoss(
              f"{desc}: loss became {loss} at step {step + 1}; stopped without saving. The last "
              f"good checkpoint (step {last}) is kept in {ckpt.directory}. Lower the learning "
              "rate or raise grad_clip, then rerun with --resume.")
        done = step + 1
        if log is not None and (done % loop.log_every == 0 or done == loop.steps):
          log.write(done, metrics)
        if on_step is not None:
          on_step(done, metrics)
        bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.update(1)
        ckpt.save(state)
        stop = flag.received or _preempted(done)
        if stop:
          ckpt.save(state, force=True)
          raise Interrupted(
              f"{desc}: {stop} at step {done}; checkpoint saved in {ckpt.directory}. "
              "Rerun the same command with --resume to continue.")
    ckpt.save(state, force=True)
  finally:
    ckpt.close()
  return state
