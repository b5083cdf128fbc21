"""Two `moeqjax qat` processes (jax.distributed on 127.0.0.1, 2 CPU devices each) equal one
process with 4 devices; a SIGTERM on one of them saves on both, and one process resumes it."""

import json
import os
import re
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from moeqjax.train.metrics_log import read_metrics

CHILD = pathlib.Path(__file__).with_name("multiprocess_child.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
RTOL = 1e-5
DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_env(devices: int, cache: pathlib.Path | None, extra: dict) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
  if cache is not None:
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={devices}").strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return {**env, **extra}


def start(argv, devices: int, log: pathlib.Path, cache=None, **extra) -> subprocess.Popen:
  """A child with `devices` CPU devices; its stderr goes to `log` (a pipe could fill and block);
  `cache`: a folder for JAX's persistent compilation cache; `extra`: more environment."""
  with log.open("w") as err:
    proc = subprocess.Popen([sys.executable, *map(str, argv)],
                            env=child_env(devices, cache, extra),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True)
  proc.log = log
  return proc


def finish(proc: subprocess.Popen, what: str, stdin: str | None = None) -> tuple[str, str]:
  out, _ = proc.communicate(stdin, timeout=300)
  err = proc.log.read_text()
  if proc.returncode and what:
    raise AssertionError(f"{what} failed ({proc.returncode}):\n{err[-4000:]}")
  return out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  scratch = tmp_path_factory.mktemp("multiprocess")
  (scratch / "corpus.txt").write_text("".join(
      f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
  t0 = time.perf_counter()
  # The one-process child compiles its QAT programs twice (its run, then the resume): the second
  # time they come from its compilation cache.
  single = start([CHILD, "single", scratch], 4, scratch / "single.err", scratch / "jax_cache")
  # Process 1 of 2 whose coordinator never comes (nothing listens on its port), set up through
  # the environment variables: a process of its own, since jax.distributed must start before
  # JAX's backend.
  lonely_port = free_port()
  lonely = start(["-m", "moeqjax.cli", "qat", "--teacher", scratch / "none",
                  "--distributed-timeout", 1], 1, scratch / "lonely.err",
                 JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{lonely_port}", JAX_NUM_PROCESSES="2",
                 JAX_PROCESS_ID="1")
  procs = []
  try:
    for line in single.stdout:  # the CLI's own lines come first
      if line.strip() == "teacher ready":
        break
    else:
      finish(single, "the teacher's pretraining")
    port = free_port()
    procs = [start([CHILD, "proc", i, port, scratch], 2, scratch / f"proc{i}.err")
             for i in range(2)]
    outs = [finish(p, f"process {i}") for i, p in enumerate(procs)]
    out, _ = finish(single, "the one-process run", stdin="go\n")
    _, lonely_err = finish(lonely, "")
  finally:
    for p in (single, lonely, *procs):
      if p.poll() is None:
        p.kill()
        p.wait()
  wall = time.perf_counter() - t0
  moved = json.loads(out.strip().splitlines()[-1])
  print(f"two-process check: {wall:.1f} s wall; one process: {moved.pop('seconds')}")
  return (scratch, outs, moved,
          (lonely.returncode, lonely_err.strip(), lonely_port))


def test_two_processes_equal_one_process_with_four_devices(runs):
  scratch, outs, _, _ = runs
  facts = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  print("two processes:", [f.pop("seconds") for f in facts], "s each")
  assert facts == [{"process": i, "processes": 2, "local_devices": 2, "devices": 4, "exit": 130}
                   for i in range(2)]
  one, two = read_metrics(scratch / "one" / "metrics.jsonl"), read_metrics(
      scratch / "two" / "metrics.jsonl")
  assert [m["step"] for m in one] == [1, 2, 3, 4, 5]
  assert [m["step"] for m in two] == list(range(1, len(two) + 1))
  assert {"train/task", "train/rec", "train/kd", "train/value", "train/struct", "train/lb",
          "train/z", "train/loss", "train/grad_norm"} <= set(one[0])
  for a, b in zip(two, one):
    for key, want in b.items():
      assert abs(a[key] - want) <= RTOL * abs(want), (a["step"], key, a[key], want)
  # Process 0 alone draws the progress bar (each says why it stopped: see the next test).
  (_, err0), (_, err1) = outs
  bar = re.compile(r"qat two: +\d+%\|")
  assert bar.search(err0) and not bar.search(err1)


def test_sigterm_on_one_host_saves_on_all_and_resumes_in_one_process(runs):
  """Process 1 alone got SIGTERM after step 1: both saved at the step JAX's preemption service
  agreed on and said so; one process resumes that checkpoint and lands on the one-process run."""
  scratch, outs, moved, _ = runs
  saved = sorted(int(p.name) for p in (scratch / "two" / "ckpt").iterdir() if p.name.isdigit())
  stop = saved[-1]
  assert 2 <= stop < 5, saved  # the notice came after step 1, and the run did not finish
  assert len(read_metrics(scratch / "two" / "metrics.jsonl")) == stop
  for _, err in outs:
    assert f"preemption notice (SIGTERM) at step {stop}; checkpoint saved" in err
  assert moved["devices"] == 4 and moved["processes"] == 1
  assert moved["params_5_moved_vs_one"] <= RTOL
  one = read_metrics(scratch / "one" / "metrics.jsonl")
  resumed = read_metrics(scratch / "moved" / "metrics.jsonl")
  assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
  for a, b in zip(resumed[stop:], one[stop:]):
    for key, want in b.items():
      assert abs(a[key] - want) <= RTOL * abs(want), (a["step"], key, a[key], want)


def test_unreachable_coordinator_is_one_line(runs):
  code, err, port = runs[3]
  assert code == 2 and "\n" not in err, err
  assert f"could not reach the coordinator 127.0.0.1:{port} within 1 s" in err
  assert "start process 0 there with the same --coordinator" in err
