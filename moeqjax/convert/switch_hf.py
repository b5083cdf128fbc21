"""Import and export of Hugging Face Switch Transformers checkpoints (SwitchTransformersForConditionalGeneration)."""

from __future__ import annotations

import itertools
import json
import pathlib

import jax

from moeqjax.convert import output_guard
from moeqjax.convert.errors import ConvertError
from moeqjax.convert.hf_export import KIND, write_safetensors
from moeqjax.convert.hf_import import NP_DTYPES, check_tensors, read_hf_config, read_params
from moeqjax.convert.safetensors_io import index_checkpoint
from moeqjax.convert.student_weights import ParamWeights, StudentWeights
from moeqjax.convert.switch_hf_config import hf_config_to_switch_config, switch_config_to_hf_config
from moeqjax.convert.switch_layout import TIED_COPIES, UNTIED_SHARED, switch_entries
from moeqjax.model import SwitchConfig, SwitchTransformer
from moeqjax.model.switch import switch_param_shapes


def load_switch_params(hf_dir: str | pathlib.Path, cfg: SwitchConfig) -> dict:
  """Streams the checkpoint into params of dtype cfg.param_dtype (one of our arrays at a time).

  Raises:
    ConvertError: a missing tensor (an expert, say), a misshapen one, or one with no place.
  """
  index = index_checkpoint(hf_dir)
  ents = switch_entries(cfg)
  ignorable = TIED_COPIES if cfg.tie_embeddings else (UNTIED_SHARED[0],)
  check_tensors(index, ents, False, ignorable)
  return read_params(index, ents, switch_param_shapes(cfg), NP_DTYPES[cfg.param_dtype])


def from_hf_switch(hf_dir: str | pathlib.Path, dtype: str = "float32", *,
                   allow_unknown: bool = False):
  """Imports a local switch_transformers safetensors checkpoint.

  Args:
    hf_dir: folder with config.json and model.safetensors (or shards + index).
    dtype: "float32" or "bfloat16" for params and activations.
    allow_unknown: ignore config.json keys this converter does not know (default: error).

  Returns:
    (model, params): `model.apply({"params": params}, encoder_ids_BxS, decoder_ids_BxT)` gives
    (logits [B, T, V], aux); `model.cfg` is the SwitchConfig.

  Raises:
    ConvertError: with the file, tensor or config field at fault.
  """
  if dtype not in NP_DTYPES:
    raise ConvertError(f"dtype={dtype!r}; choose from {sorted(NP_DTYPES)}")
  cfg = hf_config_to_switch_config(read_hf_config(hf_dir), dtype, allow_unknown=allow_unknown)
  return SwitchTransformer(cfg), load_switch_params(hf_dir, cfg)


def switch_state_dict(weights: StudentWeights):
  """Yields (hf_name, array [HF layout, float32]) in checkpoint order, one tensor at a time.

  Quantized weights come dequantized, as the student's forward pass uses them.
  """
  cfg = weights.cfg
  for path, group in itertools.groupby(switch_entries(cfg), key=lambda e: e.path):
    w = weights.dequantized(path)
    for ent in group:
      a = w[ent.expert] if ent.expert is not None else w
      yield ent.hf_name, (a.T if ent.transpose else a)
  if not cfg.tie_embeddings:
    name, path = UNTIED_SHARED
    yield name, weights.dequantized(path)


def export_hf_switch(cfg: SwitchConfig, params, quant, out_dir: str | pathlib.Path,
                     family_config_json: dict | None = None, dtype: str = "float32",
                     **options) -> pathlib.Path:
  """`write_hf_switch` of a student given as params and its `quant` collection (None: as they are)."""
  return write_hf_switch(ParamWeights(cfg, jax.device_get(params), quant), out_dir,
                         family_config_json, dtype, **options)


def write_hf_switch(weights: StudentWeights, out_dir: str | pathlib.Path,
                    family_config_json: dict | None = None, dtype: str = "float32", *,
                    max_shard_bytes: int = 5 * 2**30, overwrite: bool = False,
                    extra_files: dict | None = None) -> pathlib.Path:
  """Writes config.json and safetensors that transformers loads as its Switch Transformer.

  The student (params + codes, or a packed checkpoint: serve.packed_source.PackedWeights) is
  written dequantized, so transformers computes what the fake-quant student computes (exactly in
  float32).

  Args:
    weights: the student; weights.cfg is a SwitchConfig.
    out_dir: output folder; it must not exist, be empty, or (with `overwrite`) be an hf export
      moeqjax wrote.
    family_config_json: the original config.json (keeps token ids and metadata); optional.
    dtype: "float32" (exact) or "bfloat16" weights.
    max_shard_bytes: split into shards plus model.safetensors.index.json above this size.
    overwrite: replace an hf folder moeqjax wrote (anything else is refused).
    extra_files: {name: bytes} written beside the weights (the tokenizer's files).

  Returns:
    out_dir as a Path.
  """
  if dtype not in NP_DTYPES:
    raise ConvertError(f"dtype={dtype!r}; choose from {sorted(NP_DTYPES)}")
  cfg = weights.cfg
  out_dir = output_guard.check_output(out_dir, KIND, overwrite)
  hf_config = switch_config_to_hf_config(cfg, family_config_json, dtype)
  specs = [(e.hf_name, e.hf_shape) for e in switch_entries(cfg)]
  if not cfg.tie_embeddings:
    specs.append((UNTIED_SHARED[0], (cfg.vocab_size, cfg.d_model)))
  with output_guard.building_folder(out_dir, KIND, overwrite, extra_files) as tmp:
    write_safetensors(tmp, specs, switch_state_dict(weights), NP_DTYPES[dtype], max_shard_bytes)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
  return out_dir
