"""`moeqjax eval`: a finished QAT run against its full-precision teacher on held-out data."""

from __future__ import annotations

import copy
import json
import pathlib

import ml_collections
import numpy as np

from moeqjax.model import init_ratios
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import runs
from moeqjax.pipeline.distributed import is_primary
from moeqjax.pipeline.mesh import eval_mesh, sharded_template
from moeqjax.pipeline.workdirs import (finished_state, load_data, recorded_expert_codes,
                                       state_template)
from moeqjax.data import eval_windows
from moeqjax.eval import evaluate_variants
from moeqjax.eval.report import capacity_note  # the CLI (pipeline modules only) prints it  # noqa: F401


class UnfinishedRun(config_io.ConfigError):
  """A workdir whose run has not reached its last step."""


def restore_qat_state(config, workdir: pathlib.Path):
  """The student (params and codes; the state's other fields are None) of a finished QAT run in
  `workdir` (no params are initialised; on a mesh every array is restored into its shards)."""
  steps = config.qat.steps
  state = finished_state(workdir, sharded_template(config, state_template(config, "qat",
                                                                   recorded_expert_codes(workdir))),
                         steps,
                         parts=("params", "quant"))  # not the optimizer state nor the teacher
  if state is None:
    raise UnfinishedRun(f"{workdir} holds no finished QAT run of {steps} steps; finish it "
                        f"with `moeqjax qat --workdir {workdir} --resume ...`")
  return state


CONTROL = "control"  # eval.json's name for the --control run
CONTROL_RECIPE = ("make one with `moeqjax qat --teacher TEACHER --workdir CONTROL "
                  "--config.quant.expert_code=0` and the student's other settings")
# Quant rules that must be 0 in a full-precision control (every tensor unquantized).
_FP_RULES = ("expert_code", "attn_code", "shared_code", "router_code", "lm_head_code", "act_bits")
# qat fields that say how a run is logged or saved, not what it trains: free to differ.
_QAT_FREE = ("log_every", "ckpt_every", "seed")


def control_config(config, workdir: pathlib.Path, control: pathlib.Path,
                   teacher: pathlib.Path | None):
  """The config to restore `control` with: a finished full-precision `moeqjax qat` run of the same
  model, teacher, data, objective (loss section) and schedule (qat section, seed aside) as the
  student in `workdir`; anything else is a one-line error naming what differs."""
  control = pathlib.Path(control)
  runs.require_kind(control, "--control", ("qat",), CONTROL_RECIPE)
  student, ctl = runs.recorded_sections(workdir), runs.recorded_sections(control)
  what = f"--workdir {workdir} and --control {control}"
  runs.check_same_model(student["model"], ctl["model"], what)
  record = runs.read_record(control)
  quant = ctl.get("quant", {})
  quantized = [f"quant.{k}={quant.get(k)}" for k in _FP_RULES if quant.get(k) != 0]
  codes = record.get("expert_codes")
  if codes is not None and np.any(np.asarray(codes) != 0):  # [L, E] or [L, 3, E]
    quantized.append("an allocation with expert codes above 0")
  if "realloc" in record:
    quantized.append("re-allocation (realloc)")
  if quantized:
    raise runs.RunMismatch(f"--control {control} is not full precision ({', '.join(quantized)}); "
                           + CONTROL_RECIPE)
  differ = []
  for section, free in (("loss", ()), ("qat", _QAT_FREE)):
    a, b = student.get(section, {}), ctl.get(section, {})
    differ += [f"{section}.{k}" for k in sorted(set(a) | set(b))
               if k not in free and a.get(k) != b.get(k)]
  data_a, data_b = (runs.comparable({"data": s["data"]})["data"] for s in (student, ctl))
  differ += [f"data.{k}" for k in sorted(set(data_a) | set(data_b)) if data_a.get(k) != data_b.get(k)]
  if teacher is not None:
    trained_from = runs.recorded_teacher(control)
    if trained_from is None or trained_from.resolve() != pathlib.Path(teacher).resolve():
      differ.append(f"teacher ({trained_from} vs {teacher})")
  if differ:
    raise runs.RunMismatch(f"{what} were not trained alike ({', '.join(differ)}); a control "
                           "needs the student's objective, schedule, data and teacher")
  out = copy.deepcopy(config)
  with out.unlocked():  # a field the control's record predates keeps the config's value
    out.quant = ml_collections.ConfigDict({**config.quant.to_dict(), **quant})
    out.qat = ml_collections.ConfigDict({**config.qat.to_dict(), **ctl.get("qat", {})})
  return out


def evaluate_qat_run(config, workdir: pathlib.Path, teacher_params, *,
                     control: pathlib.Path | None = None,
                     teacher: pathlib.Path | None = None) -> dict:
  """Evaluates teacher and student (and a control) on the config's mesh (every device of every
  process; one device: unsharded); process 0 writes workdir/eval.json. Returns the metrics (on
  every process).

  Args:
    config: the student's config (its recorded sections).
    workdir: a finished `moeqjax qat` or `moeqjax ptq` run.
    teacher_params: the teacher's params.
    control: optional finished `moeqjax qat` run at full precision (quant.expert_code=0) with the
      student's objective and schedule (see control_config): eval.json gets it as "control", and
      the student's entry delta_vs_control, control_topk_agree, drift_topk, ... (paired s.e.).
    teacher: the teacher's folder, which the control must have been trained from.

  A Switch config (config_io.is_switch) is evaluated by switch_phases.evaluate_run.
  """
  if config_io.is_switch(config):
    from moeqjax.pipeline import switch_phases
    return switch_phases.evaluate_run(config, workdir, teacher_params, control=control,
                                      teacher=teacher)
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  state = restore_qat_state(config, workdir)
  corpus = load_data(config)
  windows = eval_windows(corpus.valid, config.eval.seq_len, config.eval.num_windows)
  variants = {"full_precision": {"params": teacher_params}}
  if control is not None:
    ctl = restore_qat_state(control_config(config, workdir, control, teacher), control)
    # Evaluated under the student's model config (one compiled eval for all three): its ratio
    # params, if the student's rules carry them, are inert at code 0, where nothing is quantized.
    variants[CONTROL] = {"params": init_ratios(cfg, ctl.params, ctl.quant), "quant": ctl.quant}
  variants["student"] = {"params": state.params, "quant": state.quant}
  results = evaluate_variants(cfg, variants, windows, config.eval.batch_size,
                              control=None if control is None else CONTROL,
                              placement=eval_mesh(config))
  for result in results.values():
    result["unit"] = corpus.unit  # "byte" (bits per byte) or "token"
  if is_primary():
    (workdir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
  return results
