"""Starts tests/train/mesh_child.py with 8 CPU devices and reads back its JSON (and the same for
other background scripts)."""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

CHILD = pathlib.Path(__file__).with_name("mesh_child.py")
REPO = pathlib.Path(__file__).resolve().parents[2]


def start_background(script: pathlib.Path, prefix: str, env=None) -> subprocess.Popen:
  """`python script SCRATCH` in a fresh scratch folder, its output piped back."""
  scratch = tempfile.mkdtemp(prefix=prefix)
  proc = subprocess.Popen([sys.executable, str(script), scratch], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  proc.started = time.perf_counter()
  proc.scratch = scratch
  proc.script = script
  return proc


def background_json(proc: subprocess.Popen, timeout=600) -> dict:
  """The JSON on the last stdout line of a start_background process, plus wall_s and scratch."""
  out, err = proc.communicate(timeout=timeout)
  if proc.returncode:
    raise AssertionError(f"{proc.script.name} failed ({proc.returncode}):\n{err[-4000:]}")
  result = json.loads(out.strip().splitlines()[-1])
  result["wall_s"] = time.perf_counter() - proc.started
  result["scratch"] = proc.scratch
  return result


def start_mesh_child() -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                      " --xla_backend_optimization_level=0").strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  return start_background(CHILD, "moeqjax_mesh_", env)


def mesh_results(proc: subprocess.Popen, timeout=600) -> dict:
  return background_json(proc, timeout)
