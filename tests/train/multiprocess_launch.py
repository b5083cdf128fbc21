"""Runs the two-process check's children (tests/train/multiprocess_child.py) in the background
and prints what they said as JSON; tests/conftest.py starts it when collection selects
tests/train/test_multiprocess.py, so that it runs beside the rest of the suite."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

CHILD = pathlib.Path(__file__).with_name("multiprocess_child.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(pathlib.Path(__file__).parent))
from mesh_launch import start_background  # noqa: E402

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


def orchestrate(scratch: pathlib.Path) -> dict:
  """Runs the children in order (see multiprocess_child.py) and gathers what they said."""
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
    # `moeqjax eval` of the one-process run's student across two processes.
    shutil.copytree(scratch / "one", scratch / "eval2", ignore=shutil.ignore_patterns("eval.json"))
    port = free_port()
    procs += [start([CHILD, "eval", i, port, scratch], 2, scratch / f"eval{i}.err")
              for i in range(2)]
    eval_outs = [finish(p, f"eval process {i}") for i, p in enumerate(procs[2:])]
    _, lonely_err = finish(lonely, "")
  finally:
    for p in (single, lonely, *procs):
      if p.poll() is None:
        p.kill()
        p.wait()
  wall = time.perf_counter() - t0
  return {"outs": outs, "eval_outs": eval_outs, "children_wall_s": round(wall, 1),
          "moved": json.loads(out.strip().splitlines()[-1]),
          "lonely": [lonely.returncode, lonely_err.strip(), lonely_port]}


def start_launcher():
  """This file as a background process (mesh_launch.start_background) named "multiprocess"."""
  return start_background(pathlib.Path(__file__), "multiprocess")


if __name__ == "__main__":
  # Stopped early (conftest terminates it): unwind through orchestrate's cleanup of the children.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  folder = pathlib.Path(sys.argv[1])
  (folder / "corpus.txt").write_text("".join(
      f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200)))
  print(json.dumps(orchestrate(folder)))
