"""Export of a (quantized) model to a HF family layout: dequantized weights + config.json."""

from __future__ import annotations

import itertools
import json
import pathlib

import jax
import numpy as np

from moeqjax.convert import layout
from moeqjax.convert.hf_config import family_of, model_config_to_hf_config
from moeqjax.convert.hf_import import NP_DTYPES
from moeqjax.convert.safetensors_io import INDEX_FILE, SINGLE_FILE, StreamingWriter
from moeqjax.convert.tree_paths import get_path
from moeqjax.model import ModelConfig
from moeqjax.quant import quantize_dequantize
from moeqjax.quant.clip import learned_ratio


def dequantized(cfg: ModelConfig, params, quant, path: tuple[str, ...]) -> np.ndarray:
  """Our param at `path` as the quantized student's forward pass sees it (float32 numpy)."""
  w = get_path(params, path)
  if quant is not None and path[-1] in ("w_in", "w_gate", "w_out"):
    codes = get_path(quant, path[:-1] + ("expert_bits",))
    if codes is not None:
      spec = cfg.quant.spec()
      # The ratio the student's forward pass uses, not the raw param.
      w = quantize_dequantize(w, codes, spec, learned_ratio(params, path, spec))
  elif quant is not None and path[-1] == "kernel":
    codes = get_path(quant, path[:-1] + ("bits",))
    if codes is not None:
      w = quantize_dequantize(w, codes, cfg.quant.spec())
  return np.asarray(jax.device_get(w)).astype(np.float32)


def hf_state_dict(cfg: ModelConfig, params, quant=None, model_type: str | None = None):
  """Yields (hf_name, array [HF layout, float32]) in checkpoint order, one tensor at a time."""
  from moeqjax.convert.hf_config import infer_model_type
  fam = family_of({"model_type": model_type or infer_model_type(cfg)})
  for path, group in itertools.groupby(layout.entries(cfg, fam), key=lambda e: e.path):
    w = dequantized(cfg, params, quant, path)
    for ent in group:
      a = w[ent.expert] if ent.expert is not None else w
      yield ent.hf_name, (a.T if ent.transpose else a)


def export_hf(cfg: ModelConfig, params, quant, out_dir: str | pathlib.Path,
              family_config_json: dict | None = None, dtype: str = "bfloat16", *,
              model_type: str | None = None, max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes config.json and safetensors weights that transformers loads as the family's model.

  Quantized weights (experts, and attention / shared expert / router / lm_head where their
  rules quantize them) are written dequantized, so the HF model computes what our fake-quant
  student computes (exactly in float32; bf16 adds one rounding).

  Args:
    cfg: our model config.
    params: the student params (our tree).
    quant: the student's `quant` collection (None writes the params as they are).
    out_dir: output folder (created).
    family_config_json: the original HF config.json (keeps token ids and metadata); optional.
    dtype: "bfloat16" or "float32" weights.
    model_type: the HF family; default from family_config_json, else inferred from cfg.
    max_shard_bytes: split into shards plus model.safetensors.index.json above this size.

  Returns:
    out_dir as a Path.
  """
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  hf_config = model_config_to_hf_config(cfg, model_type, family_config_json, dtype)
  fam = family_of(hf_config)
  target = NP_DTYPES[dtype]
  ents = layout.entries(cfg, fam)
  # Shard assignment from shapes alone, so every writer's header is known before any data.
  shards, size = [[]], 0
  for ent in ents:
    n = int(np.prod(ent.hf_shape)) * target.itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(ent)
    size += n
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  shard_of = {ent.hf_name: i for i, shard in enumerate(shards) for ent in shard}
  writers = [StreamingWriter(out_dir / name, [(e.hf_name, e.hf_shape, target) for e in shard])
             for name, shard in zip(names, shards)]
  try:
    for name, arr in hf_state_dict(cfg, params, quant, fam.model_type):
      writers[shard_of[name]].write(name, np.ascontiguousarray(arr).astype(target))
  finally:
    for w in writers:
      w.close()
  if len(shards) > 1:
    total = sum(int(np.prod(e.hf_shape)) * target.itemsize for e in ents)
    index = {"metadata": {"total_size": total},
             "weight_map": {e.hf_name: names[shard_of[e.hf_name]] for e in ents}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return out_dir
