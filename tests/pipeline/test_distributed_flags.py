"""Multi-process settings: flags over JAX_* environment variables, one-line errors, and the
arguments jax.distributed.initialize receives (the real two-process run: tests/train)."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import pytest

from moeqjax.pipeline import distributed
from moeqjax.pipeline.distributed import DistributedConfig, DistributedError, from_flags

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_dist_env(monkeypatch):
  for name in distributed.ENV.values():
    monkeypatch.delenv(name, raising=False)


def test_single_process_without_flags_or_environment(monkeypatch):
  dist = from_flags(None, None, None, 300)
  assert not dist.enabled
  called = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: called.append((a, k)))
  distributed.initialize(dist)
  assert called == []  # nothing changes for one process


def test_environment_fills_what_the_flags_leave_out(monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert from_flags(None, None, None, 60) == DistributedConfig("10.0.0.2:1234", 4, 3, 60)
  # flags win over the environment
  assert from_flags("h:9", 2, 1, 5) == DistributedConfig("h:9", 2, 1, 5)
  monkeypatch.setenv("JAX_PROCESS_ID", "x")
  with pytest.raises(DistributedError, match="JAX_PROCESS_ID='x' is not an integer"):
    from_flags(None, None, None, 60)


@pytest.mark.parametrize("args, message", [
    (("10.0.0.2", 2, 0), r"--coordinator '10.0.0.2' is not HOST:PORT"),
    (("10.0.0.2:1234", None, 0), r"also needs --num-processes"),
    (("10.0.0.2:1234", 2, None), r"also needs --process-id"),
    (("10.0.0.2:1234", 2, 2), r"--process-id 2 of --num-processes 2: need 0 <= process id"),
    ((None, 2, 1), r"^--num-processes 2 --process-id 1 needs a coordinator; add --coordinator "
                   r"HOST:PORT"),
    ((None, None, 1), r"^--process-id 1 needs a coordinator"),
])
def test_incomplete_or_wrong_settings_name_the_fix(args, message):
  with pytest.raises(DistributedError, match=message):
    from_flags(*args, 300)
  with pytest.raises(DistributedError, match="--distributed-timeout 0 must be >= 1"):
    from_flags("h:1", 2, 0, 0)


def test_what_jax_distributed_receives(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
  distributed.initialize(from_flags("127.0.0.1:1", 2, 0, 7))  # process 0 hosts the service
  distributed.initialize(from_flags("auto", None, None, 9))  # JAX detects the cluster
  # jaxlib's own deadline comes after ours (the watchdog's, see the next test)
  grace = distributed.JAXLIB_GRACE_S
  assert calls == [(("127.0.0.1:1", 2, 0), {"initialization_timeout": 7 + grace}),
                   ((), {"initialization_timeout": 9 + grace})]


def test_peers_that_never_arrive_are_one_line_and_exit_2(tmp_path):
  """Process 0 of 2 alone: jaxlib would abort (SIGABRT, a C++ stack trace) at its deadline; the
  watchdog prints one line and exits 2 at --distributed-timeout instead."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k not in distributed.ENV.values()}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
  argv = [sys.executable, "-m", "moeqjax.cli", "qat", "--teacher", str(tmp_path), "--coordinator",
          f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", "0",
          "--distributed-timeout", "2"]
  t0 = time.perf_counter()
  run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
  elapsed = time.perf_counter() - t0
  err = run.stderr.strip()
  assert run.returncode == 2 and "\n" not in err, (run.returncode, err[-3000:])
  assert err == (f"moeqjax: error: process 0 waited 2 s for all processes to register with the "
                 f"coordinator 127.0.0.1:{port}, and they did not (jaxlib does not say how many "
                 f"arrived); start all 2 processes (--process-id 0 to 1) with the same "
                 f"--coordinator 127.0.0.1:{port} and --num-processes 2 (or make --num-processes "
                 "the number you start), or raise --distributed-timeout")
  assert elapsed >= 2


def test_auto_outside_a_cluster_is_one_line(monkeypatch):
  def no_cluster(**kwargs):
    raise ValueError("coordinator_address should be defined.")  # what JAX says there
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  with pytest.raises(DistributedError, match=r"--coordinator auto: JAX found no cluster "
                     r"\(coordinator_address should be defined.\); give --coordinator HOST:PORT"):
    distributed.initialize(from_flags("auto", None, None, 9))


def test_registration_timeout_with_auto_names_the_cluster():
  """--coordinator auto: JAX picks the process ids, so the line names none."""
  assert distributed.registration_timeout_message(from_flags("auto", None, None, 9)) == (
      "this process waited 9 s for all processes to register with the coordinator JAX detected "
      "(--coordinator auto), and they did not (jaxlib does not say how many arrived); start the "
      "same command on every worker of the cluster, or raise --distributed-timeout")
