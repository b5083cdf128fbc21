"""Starts background scripts for the suite (tests/train/mesh_child.py with 8 CPU devices, the
two-process check) and reads back their JSON from any process of the test run.

Under pytest-xdist the worker that starts a script (gw0) need not be the one that runs its tests,
so everything a script leaves (stdout, stderr, exit code, its scratch folder) goes to a folder
that all processes of the run find from PYTEST_XDIST_TESTRUNUID."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

CHILD = pathlib.Path(__file__).with_name("mesh_child.py")
REPO = pathlib.Path(__file__).resolve().parents[2]
_LOCAL_RUN = f"pid{os.getpid()}"  # a run without xdist is one process


def run_folder(name: str) -> pathlib.Path:
  """Where the background script `name` of this test run keeps its files."""
  run = os.environ.get("PYTEST_XDIST_TESTRUNUID") or _LOCAL_RUN
  return pathlib.Path(tempfile.gettempdir()) / f"moeqjax_tests_{run}" / name


class Started:
  """A background script this process started: `wait` reaps it, `stop` kills it and its files."""

  def __init__(self, proc: subprocess.Popen, folder: pathlib.Path):
    self.proc, self.folder = proc, folder
    # The exit code is written by the starting process, which alone can reap the child.
    self.reaper = threading.Thread(target=self._reap, daemon=True)
    self.reaper.start()

  def _reap(self):
    code = self.proc.wait()
    (self.folder / "rc.tmp").write_text(str(code))
    (self.folder / "rc.tmp").rename(self.folder / "rc")

  def wait(self, timeout=600):
    self.reaper.join(timeout)

  def stop(self):
    if self.proc.poll() is None:
      self.proc.terminate()  # the two-process launcher then stops its own children
      try:
        self.proc.wait(30)
      except subprocess.TimeoutExpired:
        self.proc.kill()
    self.reaper.join(30)
    forget(self.folder.name)


def start_background(script: pathlib.Path, name: str, env=None) -> Started:
  """`python script SCRATCH` with SCRATCH inside its run folder; output goes to files there."""
  folder = run_folder(name)
  scratch = folder / "scratch"
  scratch.mkdir(parents=True)
  with (folder / "out").open("w") as out, (folder / "err").open("w") as err:
    proc = subprocess.Popen([sys.executable, str(script), str(scratch)], env=env,
                            stdout=out, stderr=err, text=True)
  (folder / "started.json").write_text(json.dumps(
      {"time": time.time(), "script": script.name, "scratch": str(scratch)}))
  return Started(proc, folder)


def background_json(name: str, timeout=600) -> dict:
  """Waits for the background script `name` of this run to end; the JSON on its last stdout
  line, plus wall_s (since it started) and scratch. The caller calls forget(name) when done."""
  folder = run_folder(name)
  if not (folder / "started.json").exists():
    raise AssertionError(f"the background script {name!r} was not started for this run "
                         f"(tests/conftest.py starts it at collection; expected {folder})")
  started = json.loads((folder / "started.json").read_text())
  deadline = time.time() + timeout
  while not (folder / "rc").exists():
    if time.time() > deadline:
      raise AssertionError(f"{started['script']} did not finish within {timeout} s")
    time.sleep(0.2)
  code = int((folder / "rc").read_text())
  if code:
    err = (folder / "err").read_text()
    raise AssertionError(f"{started['script']} failed ({code}):\n{err[-4000:]}")
  result = json.loads((folder / "out").read_text().strip().splitlines()[-1])
  result["wall_s"] = time.time() - started["time"]
  result["scratch"] = started["scratch"]
  return result


def forget(name: str):
  """Removes what the background script `name` left (and the run's folder once it is empty)."""
  folder = run_folder(name)
  shutil.rmtree(folder, ignore_errors=True)
  try:
    folder.parent.rmdir()
  except OSError:  # another script's files are still there, or it is gone already
    pass


def mesh_env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                      " --xla_backend_optimization_level=0").strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return env


def start_mesh_child() -> Started:
  return start_background(CHILD, "mesh", mesh_env())
