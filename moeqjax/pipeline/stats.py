"""`moeqjax stats`: the router statistics of a pretrain or QAT workdir as a table and router_stats.json."""

from __future__ import annotations

import json
import pathlib

import ml_collections
import numpy as np

from moeqjax.alloc.allocation import expert_stats
from moeqjax.model import expert_codes
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.workdirs import (CONFIG_RECORD, latest_state, recorded_expert_codes,
                                       state_template)

_SECTIONS = ("model", "quant", "data", "pretrain", "qat", "loss", "seq2seq", "eval")
COLUMNS = ("lambda", "grad_norm_sum", "grad_norm_ema", "count", "mean_gate", "neuron_variance",
           "router_norm_start", "router_norm_now")


class NoRun(config_io.ConfigError):
  """The workdir holds no run that can be restored."""


def workdir_config(config, workdir: pathlib.Path):
  """`config` with the sections recorded in workdir/config.json, and the phase: "pretrain", "qat" or
  "finetune" (the study's full-precision fine-tune, optimizer of the qat section at its own lr)."""
  record_path = workdir / CONFIG_RECORD
  if not record_path.is_file() or not (workdir / "ckpt").is_dir():
    raise NoRun(f"{workdir} holds no pretrain or QAT run (no config.json and ckpt/); pass the "
                "--workdir of a `moeqjax pretrain` or `moeqjax qat` run")
  record = json.loads(record_path.read_text())
  config = ml_collections.ConfigDict(config.to_dict())
  for name in _SECTIONS:
    if name in record:
      config[name] = ml_collections.ConfigDict(record[name])
  if "expert_codes" in record:  # pipeline.qat records the codes it started from
    return config, "qat"
  if "finetune" in record:
    with config.qat.unlocked():
      config.qat.learning_rate = record["finetune"]["lr"]
    return config, "finetune"
  return config, "pretrain"


def restore_latest(config, workdir: str | pathlib.Path):
  """(config, phase, state) of the latest checkpoint in a pretrain or QAT workdir (finished or not);
  the state holds the params, statistics, step and a QAT run's codes (its other fields are None)."""
  workdir = pathlib.Path(workdir)
  config, phase = workdir_config(config, workdir)
  # A fine-tune's state has no quant codes and no teacher: it restores like a pretrain state (the
  # optimizer state's structure does not depend on its hyper-parameters).
  template = state_template(config, "qat" if phase == "qat" else "pretrain",
                            recorded_expert_codes(workdir))
  state = latest_state(workdir, template,
                       parts=("params", "stats", "quant") if phase == "qat" else ("params", "stats"))
  if state is None:
    raise NoRun(f"{workdir}/ckpt holds no checkpoint yet; let the run save one first")
  return config, phase, state


def stats_record(config, phase: str, state) -> dict:
  """JSON-ready per-layer, per-expert statistics ([L][E] lists) of a restored state."""
  params = state.params
  switch = config_io.is_switch(config)
  if switch:  # its sparse layers as rows, encoder first (model.moe_paths)
    from moeqjax.pipeline import switch_phases
    cfg, params = switch_phases.allocation_view(config, params)
  else:
    cfg = config_io.model_config(config)
  s = expert_stats(params, state.stats, cfg.num_layers)
  record = {"phase": phase, "step": int(state.step), "stats_steps": s.pop("steps"),
            "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
            "definitions": {
                "lambda": "||w_s(T)||_2 - ||w_s(0)||_2 of the router row, 0 = start of this run "
                          "(smaller = more sensitive, gets more bits)",
                "grad_norm_sum": "sum over steps of ||dL/dw_s||_2 (a separate signal from "
                                 "lambda: AdamW with clipping does not move a router row in "
                                 "proportion to its gradient, so the two can rank experts "
                                 "differently)",
                "grad_norm_ema": "EMA (decay 0.99, no bias correction) of ||dL/dw_s||_2",
                "count": "top-k assignments of expert s",
                "mean_gate": "gate_sum / max(count, 1): mean gate weight over routed tokens",
                "neuron_variance": "V_s = max_i Var_j(W_in[s][j, i])"}}
  for key, value in s.items():
    record[key] = np.asarray(value).tolist()
  if state.quant is not None:
    record["expert_codes"] = expert_codes(state.quant, cfg.num_layers).tolist()
  if switch:
    record["layer_names"] = switch_phases.sparse_layer_names(state.params)
  return record


def format_table(record: dict) -> str:
  head = f"{'layer':>5s} {'expert':>6s} " + " ".join(f"{c:>17s}" for c in COLUMNS)
  lines = [f"{record['phase']} state at step {record['step']} ({record['stats_steps']} steps of "
           "statistics)"]
  if record.get("layer_names"):  # a Switch model: the rows are its sparse layers
    lines.append("layers: " + ", ".join(f"{l} = {name}"
                                        for l, name in enumerate(record["layer_names"])))
  lines.append(head)
  for l in range(record["num_layers"]):
    for e in range(record["num_experts"]):
      lines.append(f"{l:5d} {e:6d} " + " ".join(f"{record[c][l][e]:17.6g}" for c in COLUMNS))
  return "\n".join(lines)


def write_stats(config, workdir: str | pathlib.Path) -> dict:
  """Restores the latest state of `workdir`, writes workdir/router_stats.json, returns the record."""
  workdir = pathlib.Path(workdir)
  config, phase, state = restore_latest(config, workdir)
  record = stats_record(config, phase, state)
  (workdir / "router_stats.json").write_text(json.dumps(record, indent=2) + "\n")
  return record
