"""`moeqjax eval`: a finished QAT run against its full-precision teacher on held-out data."""

from __future__ import annotations

import json
import pathlib

from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.distributed import is_primary
from moeqjax.pipeline.mesh import eval_mesh, sharded_template
from moeqjax.pipeline.workdirs import finished_state, load_data, state_template
from moeqjax.data import eval_windows
from moeqjax.eval import evaluate_variants


class UnfinishedRun(config_io.ConfigError):
  """A workdir whose run has not reached its last step."""


def restore_qat_state(config, workdir: pathlib.Path):
  """The student (params and codes; the state's other fields are None) of a finished QAT run in
  `workdir` (no params are initialised; on a mesh every array is restored into its shards)."""
  steps = config.qat.steps
  state = finished_state(workdir, sharded_template(config, state_template(config, "qat")), steps,
                         parts=("params", "quant"))  # not the optimizer state nor the teacher
  if state is None:
    raise UnfinishedRun(f"{workdir} holds no finished QAT run of {steps} steps; finish it "
                        f"with `moeqjax qat --workdir {workdir} --resume ...`")
  return state


def evaluate_qat_run(config, workdir: pathlib.Path, teacher_params) -> dict:
  """Evaluates teacher and student on the config's mesh (every device of every process; one
  device: unsharded); process 0 writes workdir/eval.json. Returns the metrics (on every process)."""
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  state = restore_qat_state(config, workdir)
  corpus = load_data(config)
  windows = eval_windows(corpus.valid, config.eval.seq_len, config.eval.num_windows)
  results = evaluate_variants(cfg, {
      "full_precision": {"params": teacher_params},
      "student": {"params": state.params, "quant": state.quant},
  }, windows, config.eval.batch_size, placement=eval_mesh(config))
  for result in results.values():
    result["unit"] = corpus.unit  # "byte" (bits per byte) or "token"
  if is_primary():
    (workdir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
  return results
