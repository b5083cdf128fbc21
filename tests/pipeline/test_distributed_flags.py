"""Multi-process settings: flags over JAX_* environment variables, one-line errors, and the
arguments jax.distributed.initialize receives (the real two-process run: tests/train)."""

import jax
import pytest

from moeqjax.pipeline import distributed
from moeqjax.pipeline.distributed import DistributedConfig, DistributedError, from_flags


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
  assert calls == [(("127.0.0.1:1", 2, 0), {"initialization_timeout": 7}),
                   ((), {"initialization_timeout": 9})]


def test_auto_outside_a_cluster_is_one_line(monkeypatch):
  def no_cluster(**kwargs):
    raise ValueError("coordinator_address should be defined.")  # what JAX says there
  monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
  with pytest.raises(DistributedError, match=r"--coordinator auto: JAX found no cluster "
                     r"\(coordinator_address should be defined.\); give --coordinator HOST:PORT"):
    distributed.initialize(from_flags("auto", None, None, 9))
