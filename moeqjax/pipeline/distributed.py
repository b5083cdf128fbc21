"""Multi-process runs: `jax.distributed` from flags or the environment, before any other JAX use."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time

import jax

from moeqjax.pipeline.config import ConfigError

AUTO = "auto"  # --coordinator auto: jax detects the cluster (Cloud TPU, SLURM, Open MPI, k8s)
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
# jaxlib gets this much longer than --distributed-timeout, so that our watchdog speaks first.
JAXLIB_GRACE_S = 60


class DistributedError(ConfigError):
  """Bad multi-process settings, or a coordinator that could not be reached; names the fix."""


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """Where the coordinator is, how many processes there are and which one this is."""

  coordinator: str | None = None  # HOST:PORT, "auto", or None = a single process
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = 300  # how long to wait for the coordinator and the other processes

  @property
  def enabled(self) -> bool:
    return self.coordinator is not None


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer; set it to a number") from None


def from_flags(coordinator: str | None, num_processes: int | None, process_id: int | None,
               timeout_s: int) -> DistributedConfig:
  """Flags first, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, checked."""
  coordinator = coordinator or os.environ.get(ENV["coordinator"]) or None
  num_processes = num_processes if num_processes is not None else _env_int(ENV["num_processes"])
  process_id = process_id if process_id is not None else _env_int(ENV["process_id"])
  if timeout_s < 1:
    raise DistributedError(f"--distributed-timeout {timeout_s} must be >= 1 second")
  if coordinator is None:
    if num_processes is not None or process_id is not None:
      given = " ".join(f"{flag} {v}" for flag, v in (("--num-processes", num_processes),
                                                      ("--process-id", process_id)) if v is not None)
      raise DistributedError(
          f"{given} needs a coordinator; add --coordinator HOST:PORT (process 0's address) "
          f"or set {ENV['coordinator']}")
    return DistributedConfig(timeout_s=timeout_s)
  if coordinator != AUTO:
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise DistributedError(f"--coordinator {coordinator!r} is not HOST:PORT; give process 0's "
                             "address, e.g. 10.0.0.2:1234 (or 'auto' on a TPU/SLURM cluster)")
    missing = [f for f, v in (("--num-processes", num_processes), ("--process-id", process_id))
               if v is None]
    if missing:
      raise DistributedError(f"--coordinator {coordinator} also needs {' and '.join(missing)} "
                             f"(or {ENV['num_processes']} / {ENV['process_id']})")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise DistributedError(f"--process-id {process_id} of --num-processes {num_processes}: "
                             "need 0 <= process id < number of processes")
  return DistributedConfig(coordinator, num_processes, process_id, timeout_s)


def initialize(dist: DistributedConfig) -> None:
  """`jax.distributed.initialize` for a multi-process run; nothing for a single process.

  Call it before anything else asks JAX for its devices. With "auto" JAX finds the coordinator
  and the process ids itself (on a Cloud TPU VM pod slice, every worker runs the same command).
  Waiting for the coordinator and for every process to register takes at most `timeout_s` in
  all; then the process prints a one-line error and exits 2 (see `_registration_watchdog`).
  """
  if not dist.enabled:
    return
  deadline = time.monotonic() + dist.timeout_s
  if dist.coordinator != AUTO and dist.process_id != 0:
    # jaxlib aborts the whole process (no Python exception) when it cannot register with the
    # coordinator, so a worker first waits for the coordinator's port itself.
    _wait_for_port(dist, deadline)
  jax_timeout = max(1, round(deadline - time.monotonic())) + JAXLIB_GRACE_S
  try:
    with _registration_watchdog(dist, deadline):
      if dist.coordinator == AUTO:
        jax.distributed.initialize(initialization_timeout=jax_timeout)
      else:
        jax.distributed.initialize(dist.coordinator, dist.num_processes, dist.process_id,
                                   initialization_timeout=jax_timeout)
  except RuntimeError as e:  # called after JAX's backend started: a caller's bug
    raise DistributedError(f"{str(e).strip()} Initialize moeqjax.pipeline.distributed "
                           "first.") from None
  except ValueError as e:  # "auto" outside a cluster JAX knows
    raise DistributedError(f"--coordinator auto: JAX found no cluster ({e}); give --coordinator "
                           "HOST:PORT --num-processes N --process-id I instead") from None


def registration_timeout_message(dist: DistributedConfig) -> str:
  """The one line for processes that did not all register with the coordinator in time."""
  if dist.coordinator == AUTO:
    where = "the coordinator JAX detected (--coordinator auto)"
    fix = "start the same command on every worker of the cluster"
  else:
    n = dist.num_processes
    where = f"the coordinator {dist.coordinator}"
    fix = (f"start all {n} processes (--process-id 0 to {n - 1}) with the same --coordinator "
           f"{dist.coordinator} and --num-processes {n} (or make --num-processes the number "
           "you start)")
  # jaxlib's coordination service does not expose how many processes had registered.
  who = "this process" if dist.process_id is None else f"process {dist.process_id}"
  return (f"{who} waited {dist.timeout_s} s for all processes to register with {where}, and "
          f"they did not (jaxlib does not say how many arrived); {fix}, or raise "
          "--distributed-timeout")


@contextlib.contextmanager
def _registration_watchdog(dist: DistributedConfig, deadline: float):
  """Prints the one-line error and exits 2 if the body is still running at `deadline`.

  When not every process registers in time, jaxlib's client does not raise: it LOG(FATAL)s,
  aborting the process (SIGABRT) with a C++ stack trace. A Python exception cannot come out of
  that, so a daemon thread watches the clock while the main thread waits inside jaxlib (which
  releases the GIL there) and ends the process first, with os._exit because the main thread
  cannot be unwound from inside the C++ call. jaxlib's own deadline is JAXLIB_GRACE_S later.
  """
  done = threading.Event()

  def watch():
    if not done.wait(max(0.0, deadline - time.monotonic())):
      print(f"moeqjax: error: {registration_timeout_message(dist)}", file=sys.stderr, flush=True)
      os._exit(2)

  thread = threading.Thread(target=watch, name="jax.distributed watchdog", daemon=True)
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()


def _wait_for_port(dist: DistributedConfig, deadline: float) -> None:
  """Returns once the coordinator accepts TCP connections; a DistributedError at `deadline`."""
  host, _, port = dist.coordinator.rpartition(":")
  host = host.strip("[]")  # [::1]:1234
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=max(
          0.1, deadline - time.monotonic())):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"could not reach the coordinator {dist.coordinator} within {dist.timeout_s} s "
            f"({e.strerror or e}); start process 0 there with the same --coordinator and "
            "--num-processes, check the address and port, or raise --distributed-timeout"
        ) from None
      time.sleep(0.2)


def is_primary() -> bool:
  """Process 0 writes config.json, metrics, logs and the progress bar; the others only compute."""
  return jax.process_index() == 0
