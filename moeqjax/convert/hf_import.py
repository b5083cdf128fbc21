"""Streaming import of a local HF safetensors MoE checkpoint into our param tree."""

from __future__ import annotations

import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from moeqjax.convert import layout
from moeqjax.convert.errors import ConvertError
from moeqjax.convert.hf_config import family_of, hf_config_to_model_config
from moeqjax.convert.safetensors_io import index_checkpoint, read_tensor
from moeqjax.model import ModelConfig, MoETransformer

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def read_hf_config(hf_dir: str | pathlib.Path) -> dict:
  path = pathlib.Path(hf_dir) / "config.json"
  if not path.is_file():
    raise ConvertError(f"{path} does not exist; --hf-dir must be a Hugging Face model folder "
                       "(config.json + *.safetensors)")
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConvertError(f"{path} is not valid JSON: {e}") from None


def check_tensors(index: dict, ents: list[layout.Entry], tie_embeddings: bool,
                  ignorable: tuple[str, ...] = ()):
  """Every expected tensor present with the expected shape, and no unexpected ones.

  `ignorable` names tensors a checkpoint may hold that the model does not read (copies of a tied
  matrix, or one the forward pass never uses).

  Raises:
    ConvertError: naming the missing, misshapen or unexpected tensors.
  """
  expected = {e.hf_name: e for e in ents}
  missing = [n for n in expected if n not in index]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise ConvertError(f"checkpoint is missing tensor(s) {', '.join(missing[:5])}{more}; the "
                       "config.json and the weights do not belong together, or a shard is stale")
  for name, ent in expected.items():
    got = index[name].shape
    if got != ent.hf_shape:
      raise ConvertError(f"tensor {name!r} in {index[name].path.name} has shape {list(got)}; "
                         f"config.json implies {list(ent.hf_shape)}")
  ignorable = set(ignorable)
  if tie_embeddings:
    ignorable.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
  extra = sorted(n for n in index if n not in expected and n not in ignorable and
                 not n.endswith(layout.IGNORED_SUFFIXES))
  if extra:
    more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
    raise ConvertError(f"checkpoint has tensor(s) this model has no place for: "
                       f"{', '.join(extra[:5])}{more}; refusing a partial import")


def _set(tree: dict, path: tuple[str, ...], value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def load_hf_params(hf_dir: str | pathlib.Path, cfg: ModelConfig, family_config: dict) -> dict:
  """Reads the checkpoint tensor by tensor into params of dtype cfg.param_dtype.

  Each of our arrays is filled on the host (experts stacked into a preallocated [E, D, F]
  buffer) and moved to the device before the next one starts, so the host holds at most the
  params plus one stacked expert array plus one source tensor; never two full copies.
  """
  fam = family_of(family_config)
  index = index_checkpoint(hf_dir)
  ents = layout.entries(cfg, fam)
  check_tensors(index, ents, cfg.tie_embeddings)
  abstract = jax.eval_shape(
      lambda: MoETransformer(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  return read_params(index, ents, _unbox(abstract["params"]), NP_DTYPES[cfg.param_dtype])


def read_params(index: dict, ents: list[layout.Entry], shapes, target: np.dtype) -> dict:
  """The param tree of `shapes` (ShapeDtypeStruct leaves), streamed from the checked `ents`.

  One of our arrays at a time, as load_hf_params describes.
  """
  params: dict = {}
  for path, group in itertools.groupby(ents, key=lambda e: e.path):
    group = list(group)
    shape = _lookup(shapes, path)
    if group[0].expert is None:
      arr = read_tensor(index[group[0].hf_name])
      arr = (arr.T if group[0].transpose else arr).astype(target)
      del group
    else:
      arr = np.empty(shape, target)
      for ent in group:
        src = read_tensor(index[ent.hf_name])
        arr[ent.expert] = src.T if ent.transpose else src
        del src
    if arr.shape != shape:
      raise ConvertError(f"internal layout error: {path} got {arr.shape}, model wants {shape}")
    _set(params, path, jnp.asarray(arr))
    del arr
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(shapes):
    raise ConvertError("internal layout error: imported params do not match the model's tree")
  return params


def _unbox(tree):
  from flax.core import meta
  return meta.unbox(tree)


def _lookup(tree, path):
  for key in path:
    tree = tree[key]
  return tuple(tree.shape)


def from_hf(hf_dir: str | pathlib.Path, dtype: str = "float32", *, allow_unknown: bool = False):
  """Imports a local Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE safetensors checkpoint.

  Args:
    hf_dir: folder with config.json and model.safetensors (or shards + index).
    dtype: "float32" or "bfloat16" for params and activations.
    allow_unknown: ignore config.json keys this converter does not know (default: error).

  Returns:
    (model, params): `model.apply({"params": params}, tokens_BxS)` gives logits [B, S, V];
    `model.cfg` is the ModelConfig.

  Raises:
    ConvertError: with the file, tensor or config field at fault.
  """
  if dtype not in NP_DTYPES:
    raise ConvertError(f"dtype={dtype!r}; choose from {sorted(NP_DTYPES)}")
  family_config = read_hf_config(hf_dir)
  cfg = hf_config_to_model_config(family_config, dtype, allow_unknown=allow_unknown)
  params = load_hf_params(hf_dir, cfg, family_config)
  return MoETransformer(cfg), params
