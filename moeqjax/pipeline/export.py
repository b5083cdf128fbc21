"""`moeqjax export`: the student of a finished QAT workdir, an imported folder or a packed folder through the library's exporters."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections

from moeqjax.convert import ConvertError, output_guard
from moeqjax.convert.ct_export import write_compressed_tensors
from moeqjax.convert.gguf_export import SWITCH_REFUSAL, write_gguf
from moeqjax.convert.hf_export import write_hf
from moeqjax.convert.hf_tokenizer import tokenizer_files
from moeqjax.convert.switch_hf import write_hf_switch
from moeqjax.data import DOC_SEPARATOR
from moeqjax.convert.student_weights import ParamWeights
from moeqjax.model import SwitchConfig
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline import runs
from moeqjax.pipeline.workdirs import CONFIG_RECORD, latest_state, state_template
from moeqjax.serve.checkpoint import MANIFEST
from moeqjax.serve.checkpoint import SWITCH as PACKED_SWITCH
from moeqjax.serve.packed_source import PackedWeights


def load_student(workdir: pathlib.Path):
  """(cfg, params, quant) of a finished `moeqjax qat` workdir, or of an imported folder (quant None).

  Raises:
    ConvertError: not a qat run, no checkpoint, an unfinished run, or a checkpoint that cannot be
      read (one line each).
  """
  if import_hf.is_imported(workdir):
    record = json.loads((workdir / import_hf.IMPORT_MARKER).read_text())
    config = ml_collections.ConfigDict(
        {"model": record["model"], "quant": config_io.load_config(None).quant.to_dict()})
    cfg = config_io.any_model_config(config)
    return cfg, import_hf.load_imported_params(workdir, cfg), None
  record_path = workdir / CONFIG_RECORD
  if not record_path.is_file() or not (workdir / "ckpt").is_dir():
    raise ConvertError(f"--workdir {workdir} is not a finished `moeqjax qat` run (no config.json "
                       "and ckpt/); run `moeqjax qat --workdir ...` first")
  try:
    record = json.loads(record_path.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"--workdir {workdir}: config.json is corrupted ({e}); rerun `moeqjax qat` "
                       "into a fresh workdir") from e
  if "qat" not in record:
    raise ConvertError(f"--workdir {workdir} is not a `moeqjax qat` run (its config.json has no "
                       "qat section)")
  config = ml_collections.ConfigDict({k: record[k] for k in ("model", "quant", "qat")})
  cfg = config_io.any_model_config(config)
  # Shapes only: the restore brings the recorded codes and the trained student.
  template = state_template(config, "qat", record.get("expert_codes"))
  try:
    state = latest_state(workdir, template, parts=("params", "quant"))
  except Exception as e:  # orbax raises many types for a damaged checkpoint
    raise ConvertError(f"--workdir {workdir}: the checkpoint in ckpt/ cannot be read "
                       f"({type(e).__name__}); it is corrupted, rerun `moeqjax qat --resume`") from e
  if state is None:
    raise ConvertError(f"--workdir {workdir} has no checkpoint yet")
  steps, done = int(config.qat.steps), int(jax.device_get(state.step))
  if done < steps:
    raise ConvertError(f"--workdir {workdir} is unfinished (step {done} of {steps}); finish it "
                       "with `moeqjax qat --resume` before exporting")
  return cfg, state.params, state.quant


def export_student(out, *, workdir=None, packed=None, fmt: str = "hf", dtype: str = "float32",
                   hf_config_path=None, model_type: str | None = None, overwrite: bool = False,
                   fp_dtype: str = "f32", all_f32: bool = False, tokenizer=None,
                   requantize_mixed: str | None = None):
  """Exports the student of a `moeqjax qat` workdir (or an imported folder), or of a packed folder.

  Exactly one of `workdir` and `packed` is given. From a packed folder the exporters read the
  stored integer codes and scales as they are (nothing re-quantized), and its tokenizer.json.
  fmt "hf" writes the HF family layout (dequantized) to the folder `out` and returns it; "gguf"
  writes one llama.cpp file `out` from the integer codes and returns the export report;
  "compressed-tensors" writes a vLLM pack-quantized folder `out` and returns its report.
  An existing `out` is replaced only with `overwrite` and only when moeqjax wrote it as this
  format (convert/output_guard.py); with default flags the exports of a packed folder equal those
  of its workdir byte for byte (pack's default float32; the GGUF's general.name is the workdir's).
  """
  if (workdir is None) == (packed is None):
    raise ConvertError("give exactly one of --workdir (a QAT run) and --packed (a packed folder)")
  if fmt == "gguf" and _is_switch_source(workdir, packed):
    raise ConvertError(SWITCH_REFUSAL)  # before anything is read or written
  output_guard.check_output(out, fmt, overwrite)  # before the (slow) restore
  template_json = None
  if fmt != "gguf":
    template_json = _hf_config_template(hf_config_path, workdir)
  if packed is not None:
    weights = PackedWeights(packed)
    # Named after the run it was packed from, as an export of that run is.
    source = weights.manifest.get("source") or pathlib.Path(packed).absolute()
    name, recorded = pathlib.Path(source).name, weights.tokenizer
    eos_id = weights.manifest.get("eos_id")
  else:
    workdir = pathlib.Path(workdir).absolute()
    weights = ParamWeights(*load_student(workdir))
    name, recorded = workdir.name, _recorded_tokenizer(workdir)
    # A tokenizer's is in its config; a Switch model on bytes has none (pipeline.serve).
    switch = isinstance(weights.cfg, SwitchConfig)
    eos_id = DOC_SEPARATOR[0] if recorded is None and not switch else None
  if fmt == "gguf":
    return write_gguf(weights, out, fp_dtype=fp_dtype, all_f32=all_f32,
                      tokenizer=recorded if tokenizer is None else tokenizer, name=name,
                      overwrite=overwrite, requantize_mixed=requantize_mixed)
  # transformers (and vLLM) read the tokenizer from the model's folder: the run's, or our bytes.
  files = tokenizer_files(recorded, eos_id)
  if fmt == "compressed-tensors":
    return write_compressed_tensors(weights, out, template_json, dtype, model_type=model_type,
                                    overwrite=overwrite, extra_files=files)
  if isinstance(weights.cfg, SwitchConfig):
    if model_type not in (None, "switch_transformers"):
      raise ConvertError(f"--model-type {model_type}: a Switch student is written as "
                         "switch_transformers; drop --model-type")
    return write_hf_switch(weights, out, template_json, dtype, overwrite=overwrite,
                           extra_files=files)
  return write_hf(weights, out, template_json, dtype, model_type=model_type, overwrite=overwrite,
                  extra_files=files)


def _is_switch_source(workdir, packed) -> bool:
  """Whether the run or packed folder holds a Switch Transformer (its recorded model family)."""
  try:  # a missing or damaged record is reported by the export itself
    if packed is not None:
      return json.loads((pathlib.Path(packed) / MANIFEST).read_text()).get(
          "model_family") == PACKED_SWITCH
    record = json.loads((pathlib.Path(workdir) / CONFIG_RECORD).read_text())
    return config_io.is_switch_model(record.get("model"))
  except (OSError, json.JSONDecodeError, AttributeError):
    return False


def _hf_config_template(hf_config_path, workdir) -> dict | None:
  """The original HF config.json: --hf-config, else an imported workdir's own, else None."""
  if hf_config_path:
    cand = pathlib.Path(hf_config_path)
  elif workdir is not None:
    cand = pathlib.Path(workdir) / import_hf.HF_CONFIG
  else:
    return None
  if cand.is_dir():
    cand = cand / "config.json"
  if cand.is_file():
    return json.loads(cand.read_text())
  if hf_config_path:
    raise ConvertError(f"--hf-config {cand} does not exist")
  return None


def _recorded_tokenizer(workdir: pathlib.Path):
  """The tokenizer a run was made with (its own copy, else its recorded path), None for bytes."""
  return runs.run_tokenizer(workdir) or None
