"""`moeqjax import-hf`: a local HF checkpoint as a teacher folder (params, config.py, hf_config.json) for `qat --teacher`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil

import jax
import ml_collections

from moeqjax.convert import ConvertError, from_hf, from_hf_switch, read_hf_config
from moeqjax.data.tokenizer import TOKENIZER_JSON, copy_tokenizer
from moeqjax.model import SwitchConfig, init_model, init_switch
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_switch

IMPORT_MARKER = "hf_import.json"  # its presence makes a folder an imported teacher
HF_CONFIG = "hf_config.json"  # the original config.json, kept for export
CONFIG_PY = "config.py"  # the experiment config for `moeqjax qat --config`
PARAMS_DIR = "params"  # orbax checkpoint of the params tree
TOKENIZER_DIR = "tokenizer"  # the checkpoint's tokenizer files, copied (the folder stays movable)

_CONFIG_TEMPLATE = '''"""Experiment config for the model imported by `moeqjax import-hf` from {hf_dir}.

Launch QAT from the imported weights (the model section and tokenizer come from {out}):
  moeqjax qat --teacher {out} --workdir ./moeqjax_runs/qat_imported
Then export:  moeqjax export --workdir ./moeqjax_runs/qat_imported --format hf --out ./exported
The model section mirrors the checkpoint's config.json; the other sections come from {base}.
Pass this file as --config to use its other sections (quant, qat, ...) too (a Switch import's
qat starts from it without --config).
"""

import json

import ml_collections

_CONFIG = json.loads(r"""{config_json}""")


def get_config():
  return ml_collections.ConfigDict(_CONFIG)
'''


# Model fields that say how a run computes, not what the weights are: they may differ from
# the import's.
HOW_IT_RUNS = ("dispatch", "max_seq_len", "capacity_factor")


def model_section(cfg) -> dict:
  return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "quant"}


def import_checkpoint(hf_dir, out, base_config: ml_collections.ConfigDict, base_name: str,
                      dtype: str = "float32", allow_unknown: bool = False) -> pathlib.Path:
  """Imports a HF checkpoint into `out`: params (orbax), config.py, hf_config.json, marker.

  `out` is then a teacher folder: `moeqjax qat --config out/config.py --teacher out`. The family
  comes from config.json's model_type: a switch_transformers checkpoint needs a Switch
  `base_config` (import_switch.default_base) and gets span-corruption sentinels that fit its
  vocabulary and tokenizer (import_switch.sentinel_fields), recorded in the marker too.
  """
  import orbax.checkpoint as ocp
  out = pathlib.Path(out).absolute()
  if (out / PARAMS_DIR).exists() or is_imported(out):
    raise ConvertError(f"{out} already holds an imported checkpoint; choose another --out")
  switch = import_switch.is_switch_checkpoint(read_hf_config(hf_dir))
  if switch != config_io.is_switch(base_config) or (switch and "seq2seq" not in base_config):
    kind = "a switch_transformers (encoder-decoder)" if switch else "a decoder-only MoE"
    raise ConvertError(f"{hf_dir} is {kind} checkpoint but the config {base_name} is not a full "
                       "config of its family; drop --config or pass e.g. "
                       f"{'configs/switch_tiny.py' if switch else 'configs/tiny.py'}")
  model, params = (from_hf_switch if switch else from_hf)(hf_dir, dtype,
                                                          allow_unknown=allow_unknown)
  cfg = model.cfg
  has_tokenizer = (pathlib.Path(hf_dir) / TOKENIZER_JSON).is_file()
  seq2seq = {}
  if switch:  # checked before anything is written
    seq2seq = import_switch.sentinel_fields(str(hf_dir) if has_tokenizer else "", cfg.vocab_size,
                                            base_config.seq2seq.num_sentinels)
  out.mkdir(parents=True, exist_ok=True)
  config = ml_collections.ConfigDict(base_config.to_dict())
  with config.unlocked():
    config.model = ml_collections.ConfigDict(model_section(cfg))
  # The tokenizer travels with the weights: later phases (qat, eval, generate, export) read it.
  tokenizer = ""
  if has_tokenizer:
    tokenizer = TOKENIZER_DIR
    copy_tokenizer(hf_dir, out / TOKENIZER_DIR)
  with config.unlocked():
    config.data.tokenizer = str(out / TOKENIZER_DIR) if tokenizer else ""
  if switch:
    with config.unlocked():
      config.seq2seq.update(seq2seq)
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
      "tokenizer": tokenizer, "model": model_section(cfg),
      **({"seq2seq": seq2seq} if switch else {})}, indent=2) + "\n")
  return out


def default_base(hf_dir) -> str | None:
  """The base config path for `import-hf` without --config: None (configs/tiny.py) for a
  decoder-only checkpoint, configs/switch_tiny.py for a switch_transformers one."""
  return import_switch.default_base(read_hf_config(hf_dir))


def imported_config(folder):
  """An imported folder's config.py (every section), or None for a decoder-only import (whose
  phases start from configs/tiny.py, as they always did)."""
  folder = pathlib.Path(folder)
  record = json.loads((folder / IMPORT_MARKER).read_text())
  if not config_io.is_switch_model(record.get("model")):
    return None
  return config_io.load_config(folder / CONFIG_PY)


def imported_tokenizer(folder) -> str:
  """The imported checkpoint's tokenizer folder (its copy), or "" when it came without one."""
  own = pathlib.Path(folder).absolute() / TOKENIZER_DIR
  return str(own) if (own / "tokenizer.json").is_file() else ""


def is_imported(folder) -> bool:
  return (pathlib.Path(folder) / IMPORT_MARKER).is_file()


def load_imported_params(folder, cfg, target=None):
  """The params of an imported folder, checked against the model config now in use.

  `target` (abstract params, optionally with shardings) is where they are restored; None is the
  model's abstract params on the default device.
  """
  import orbax.checkpoint as ocp
  from moeqjax.train.checkpoint import restore_target
  folder = pathlib.Path(folder).absolute()
  record = json.loads((folder / IMPORT_MARKER).read_text())
  now = json.loads(json.dumps(model_section(cfg)))
  if record["model"] != now:
    changed = sorted(k for k in set(record["model"]) | set(now)
                     if record["model"].get(k) != now.get(k) and k not in HOW_IT_RUNS)
    if changed:
      raise ConvertError(f"--teacher {folder} was imported with a different model config "
                         f"(fields differ: {', '.join(changed)}); pass --config "
                         f"{folder / CONFIG_PY}")
  if target is None:
    init = init_switch if isinstance(cfg, SwitchConfig) else init_model
    target = jax.eval_shape(lambda: init(cfg, jax.random.key(0))[1])
  return ocp.StandardCheckpointer().restore(folder / PARAMS_DIR, restore_target(target))


def keep_hf_config(teacher_dir, qat_workdir):
  """Copies an imported teacher's original config.json into a QAT workdir, for `export`."""
  src = pathlib.Path(teacher_dir) / HF_CONFIG
  if is_imported(teacher_dir) and src.is_file():
    shutil.copyfile(src, pathlib.Path(qat_workdir) / HF_CONFIG)
