"""Export of a (quantized) model to a HF family layout: dequantized weights + config.json."""

from __future__ import annotations

import itertools
import json
import pathlib

import numpy as np

from moeqjax.convert import layout, output_guard
from moeqjax.convert.hf_config import family_of, model_config_to_hf_config
from moeqjax.convert.hf_import import NP_DTYPES
from moeqjax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, StreamingWriter
from moeqjax.convert.student_weights import ParamWeights, StudentWeights
from moeqjax.model import ModelConfig

KIND = "hf"  # output_guard's name for what this writes


def hf_state_dict(weights: StudentWeights, model_type: str | None = None):
  """Yields (hf_name, array [HF layout, float32]) in checkpoint order, one tensor at a time."""
  from moeqjax.convert.hf_config import infer_model_type
  cfg = weights.cfg
  fam = family_of({"model_type": model_type or infer_model_type(cfg)})
  for path, group in itertools.groupby(layout.entries(cfg, fam), key=lambda e: e.path):
    w = weights.dequantized(path)
    for ent in group:
      a = w[ent.expert] if ent.expert is not None else w
      yield ent.hf_name, (a.T if ent.transpose else a)


def export_hf(cfg: ModelConfig, params, quant, out_dir: str | pathlib.Path,
              family_config_json: dict | None = None, dtype: str = "float32",
              **options) -> pathlib.Path:
  """`write_hf` of a student given as params and its `quant` collection (None: as they are)."""
  return write_hf(ParamWeights(cfg, params, quant), out_dir, family_config_json, dtype, **options)


def write_hf(weights: StudentWeights, out_dir: str | pathlib.Path,
             family_config_json: dict | None = None, dtype: str = "float32", *,
             model_type: str | None = None, max_shard_bytes: int = 5 * 2**30,
             overwrite: bool = False, extra_files: dict | None = None) -> pathlib.Path:
  """Writes config.json and safetensors weights that transformers loads as the family's model.

  Quantized weights (experts, and attention / shared expert / router / lm_head where their
  rules quantize them) are written dequantized, so the HF model computes what our fake-quant
  student computes (exactly in float32; bf16 adds one rounding). The folder is built under a
  temporary name and renamed when complete; output_guard.MARKER in it lets a later export with
  `overwrite` replace it.

  Args:
    weights: the student (params + codes, or a packed checkpoint).
    out_dir: output folder; it must not exist, be empty, or (with `overwrite`) be an hf export
      moeqjax wrote.
    family_config_json: the original HF config.json (keeps token ids and metadata); optional.
    dtype: "float32" (default: exact) or "bfloat16" weights.
    model_type: the HF family; default from family_config_json, else inferred from cfg.
    max_shard_bytes: split into shards plus model.safetensors.index.json above this size.
    overwrite: replace an hf folder moeqjax wrote (anything else is refused).
    extra_files: {name: bytes} written beside the weights (the tokenizer's files).

  Returns:
    out_dir as a Path.

  Raises:
    ConvertError: an existing output it may not replace, or a layout no HF family fits.
  """
  cfg = weights.cfg
  out_dir = output_guard.check_output(out_dir, KIND, overwrite)
  hf_config = model_config_to_hf_config(cfg, model_type, family_config_json, dtype)
  fam = family_of(hf_config)
  target = NP_DTYPES[dtype]
  specs = [(e.hf_name, e.hf_shape) for e in layout.entries(cfg, fam)]
  with output_guard.building_folder(out_dir, KIND, overwrite, extra_files) as tmp:
    write_safetensors(tmp, specs, hf_state_dict(weights, fam.model_type), target, max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return out_dir


def write_safetensors(folder: pathlib.Path, specs: list[tuple[str, tuple[int, ...]]], arrays,
                      target: np.dtype, max_shard_bytes: int):
  """Writes the (name, array) stream `arrays`, in `specs` order, as HF safetensors in `folder`.

  One model.safetensors, or shards plus model.safetensors.index.json above max_shard_bytes.
  """
  # Shard assignment from shapes alone, so every writer's header is known before any data.
  shards, size = [[]], 0
  for name, shape in specs:
    n = int(np.prod(shape)) * target.itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((name, shape))
    size += n
  files = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  shard_of = {name: i for i, shard in enumerate(shards) for name, _ in shard}
  writers = [StreamingWriter(folder / f, [(name, shape, target) for name, shape in shard])
             for f, shard in zip(files, shards)]
  try:
    for name, arr in arrays:
      writers[shard_of[name]].write(name, np.ascontiguousarray(arr).astype(target))
  finally:
    for w in writers:
      w.close()
  if len(shards) > 1:
    total = sum(int(np.prod(shape)) * target.itemsize for _, shape in specs)
    index = {"metadata": {"total_size": total},
             "weight_map": {name: files[shard_of[name]] for name, _ in specs}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
