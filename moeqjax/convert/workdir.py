"""On-disk forms for the CLI: an imported-checkpoint folder that `qat --teacher` accepts, and export from a run."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import ml_collections

from moeqjax.convert.errors import ConvertError
from moeqjax.convert.hf_export import export_hf
from moeqjax.convert.hf_import import from_hf, read_hf_config

IMPORT_MARKER = "hf_import.json"  # its presence makes a folder an imported teacher
HF_CONFIG = "hf_config.json"  # the original config.json, kept for export
CONFIG_PY = "config.py"  # the experiment config for `moeqjax qat --config`
PARAMS_DIR = "params"  # orbax checkpoint of the params tree

_CONFIG_TEMPLATE = '''"""Experiment config for the model imported by `moeqjax import-hf` from {hf_dir}.

Launch QAT from the imported weights:
  moeqjax qat --config {out}/config.py --teacher {out} --workdir ./moeqjax_runs/qat_imported
Then export:  moeqjax export --workdir ./moeqjax_runs/qat_imported --format hf --out ./exported
The model section mirrors the checkpoint's config.json; the other sections come from {base}.
"""

import json

import ml_collections

_CONFIG = json.loads(r"""{config_json}""")


def get_config():
  return ml_collections.ConfigDict(_CONFIG)
'''


def model_section(cfg) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "quant"}


def import_checkpoint(hf_dir, out, base_config: ml_collections.ConfigDict, base_name: str,
                      dtype: str = "float32", allow_unknown: bool = False) -> pathlib.Path:
  """Imports a HF checkpoint into `out`: params (orbax), config.py, hf_config.json, marker.

  `out` is then a teacher folder: `moeqjax qat --config out/config.py --teacher out`.
  """
  import orbax.checkpoint as ocp
  out = pathlib.Path(out).absolute()
  if (out / PARAMS_DIR).exists():
    raise ConvertError(f"{out} already holds an imported checkpoint; choose another --out")
  out.mkdir(parents=True, exist_ok=True)
  model, params = from_hf(hf_dir, dtype, allow_unknown=allow_unknown)
  cfg = model.cfg
  config = ml_collections.ConfigDict(base_config.to_dict())
  with config.unlocked():
    config.model = ml_collections.ConfigDict(model_section(cfg))
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(out / PARAMS_DIR, params)
  ckptr.wait_until_finished()
  shutil.copyfile(pathlib.Path(hf_dir) / "config.json", out / HF_CONFIG)
  (out / CONFIG_PY).write_text(_CONFIG_TEMPLATE.format(
      hf_dir=hf_dir, out=out, base=base_name,
      config_json=json.dumps(config.to_dict(), indent=2, sort_keys=True)))
  n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  (out / IMPORT_MARKER).write_text(json.dumps({
      "hf_dir": str(pathlib.Path(hf_dir).absolute()), "dtype": dtype,
      "model_type": read_hf_config(hf_dir)["model_type"], "params": int(n),
      "model": model_section(cfg)}, indent=2) + "\n")
  return out


def is_imported(folder) -> bool:
  return (pathlib.Path(folder) / IMPORT_MARKER).is_file()


def load_imported_params(folder, cfg):
  """The params of an imported folder, checked against the model config now in use."""
  import orbax.checkpoint as ocp
  from moeqjax.model import init_model
  folder = pathlib.Path(folder).absolute()
  record = json.loads((folder / IMPORT_MARKER).read_text())
  now = json.loads(json.dumps(model_section(cfg)))
  if record["model"] != now:
    changed = sorted(k for k in set(record["model"]) | set(now)
                     if record["model"].get(k) != now.get(k) and k not in ("dispatch",
                                                                           "max_seq_len"))
    if changed:
      raise ConvertError(f"--teacher {folder} was imported with a different model config "
                         f"(fields differ: {', '.join(changed)}); pass --config "
                         f"{folder / CONFIG_PY}")
  target = jax.eval_shape(lambda: init_model(cfg, jax.random.key(0))[1])
  return ocp.StandardCheckpointer().restore(folder / PARAMS_DIR, target)


def _load_student(workdir: pathlib.Path):
  """(cfg, params, quant) of a finished `moeqjax qat` workdir, or of an imported folder (quant None).

  Raises:
    ConvertError: not a qat run, no checkpoint, an unfinished run, or a checkpoint that cannot be
      read (one line each).
  """
  from moeqjax import config_io, runs
  if is_imported(workdir):
    record = json.loads((workdir / IMPORT_MARKER).read_text())
    config = ml_collections.ConfigDict(
        {"model": record["model"], "quant": config_io.load_config(None).quant.to_dict()})
    cfg = config_io.model_config(config)
    return cfg, load_imported_params(workdir, cfg), None
  record_path = workdir / runs._CONFIG_RECORD
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
  cfg = config_io.model_config(config)
  # Shapes only: the restore brings the recorded codes and the trained student.
  template = runs.state_template(config, "qat")
  try:
    state = runs.latest_state(workdir, template)
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


def export_workdir(workdir, out, dtype: str = "bfloat16", hf_config_path=None,
                   model_type: str | None = None, *, fmt: str = "hf", overwrite: bool = False,
                   fp_dtype: str = "f32", all_f32: bool = False, tokenizer=None):
  """Exports the final student of a `moeqjax qat` workdir (or an imported folder).

  fmt "hf" writes the HF family layout (dequantized) to the folder `out` and returns it; "gguf"
  writes one llama.cpp file `out` from the integer codes and returns the export report;
  "compressed-tensors" writes a vLLM pack-quantized folder `out` and returns its report.
  """
  workdir = pathlib.Path(workdir).absolute()
  if fmt == "gguf":
    from moeqjax.convert.gguf_export import check_output, export_gguf
    check_output(out, overwrite)  # before the (slow) restore
    cfg, params, quant = _load_student(workdir)
    if tokenizer is None:
      tokenizer = _recorded_tokenizer(workdir)
    return export_gguf(cfg, params, quant, out, fp_dtype=fp_dtype, all_f32=all_f32,
                       tokenizer=tokenizer, name=workdir.name, overwrite=overwrite)
  if fmt == "compressed-tensors":
    from moeqjax.convert.ct_export import check_output as ct_check_output
    ct_check_output(out, overwrite)  # before the (slow) restore
  template_json = None
  for cand in ([pathlib.Path(hf_config_path)] if hf_config_path else [workdir / HF_CONFIG]):
    if cand.is_dir():
      cand = cand / "config.json"
    if cand.is_file():
      template_json = json.loads(cand.read_text())
    elif hf_config_path:
      raise ConvertError(f"--hf-config {cand} does not exist")
  cfg, params, quant = _load_student(workdir)
  if fmt == "compressed-tensors":
    from moeqjax.convert.ct_export import export_compressed_tensors
    return export_compressed_tensors(cfg, params, quant, out, template_json, dtype,
                                     model_type=model_type, overwrite=overwrite)
  return export_hf(cfg, params, quant, out, template_json, dtype, model_type=model_type)


def _recorded_tokenizer(workdir: pathlib.Path):
  """The tokenizer a qat run trained with (its recorded data.tokenizer), None for bytes."""
  from moeqjax import runs
  record_path = workdir / runs._CONFIG_RECORD
  if not record_path.is_file():
    return None
  data = json.loads(record_path.read_text()).get("data") or {}
  name = data.get("tokenizer") or ""
  return None if name in ("", "bytes") else name


def abstract_params(cfg):
  from moeqjax.model import MoETransformer
  from flax.core import meta
  v = jax.eval_shape(lambda: MoETransformer(cfg).init(jax.random.key(0),
                                                      jnp.zeros((1, 8), jnp.int32)))
  return meta.unbox(v)


def keep_hf_config(teacher_dir, qat_workdir):
  """Copies an imported teacher's original config.json into a QAT workdir, for `export`."""
  src = pathlib.Path(teacher_dir) / HF_CONFIG
  if is_imported(teacher_dir) and src.is_file():
    shutil.copyfile(src, pathlib.Path(qat_workdir) / HF_CONFIG)
