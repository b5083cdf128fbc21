"""JSON-lines metrics log."""

from __future__ import annotations

import json
import pathlib

import numpy as np


def to_python(metrics: dict) -> dict:
  """Device scalars and small arrays to plain floats/lists for JSON."""
  out = {}
  for key, value in metrics.items():
    arr = np.asarray(value)
    out[key] = arr.item() if arr.ndim == 0 else arr.tolist()
  return out


class MetricsLog:
  """Appends one JSON object per line; a resumed run drops lines past its resume step."""

  def __init__(self, path: str | pathlib.Path, resume_step: int = 0):
    self.path = pathlib.Path(path)
    self.path.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if resume_step and self.path.exists():
      kept = [line for line in self.path.read_text().splitlines()
              if line and json.loads(line).get("step", 0) <= resume_step]
    self.path.write_text("".join(line + "\n" for line in kept))

  def write(self, step: int, metrics: dict):
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **to_python(metrics)}) + "\n")


def read_metrics(path: str | pathlib.Path) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]
