"""Packed checkpoints: a student's integer codes and scales in safetensors, with a checked manifest."""

# A packed checkpoint folder holds
#   model.safetensors   every tensor: packed values (uint8), scales (float16 or float32), zero points
#                       (uint8), and the unquantized weights at `fp_dtype`;
#   manifest.json       format version, model family and config, tokenizer, per-expert codes, and
#                       per tensor its shape, dtype, byte length and sha256;
#   tokenizer.json      when the model uses one (byte-level models need none).
# Names are param paths joined by "." then the code and the role, e.g. `layers_0.moe.w_in.int3.values`.
# The model family ("moe_transformer", the decoder-only MoETransformer, or "switch", the encoder-
# decoder SwitchTransformer; manifests without one are decoder-only) says which config class and
# model the loader builds. `expert_codes` has one row per MoE block, in moe_paths order (a Switch
# model: the encoder's sparse layers, then the decoder's).

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import linen as nn

from moeqjax import quant as q
from moeqjax.convert import output_guard
from moeqjax.convert.safetensors_io import (SINGLE_FILE, StreamingWriter, dtype_name, read_header,
                                            read_tensor)
from moeqjax.convert.tree_paths import get_path
from moeqjax.data.tokenizer import TOKENIZER_JSON, copy_tokenizer, tokenizer_files
from moeqjax.eval.memory_report import expert_shapes
from moeqjax.model import MoETransformer, ModelConfig, QuantRules, SwitchConfig, SwitchTransformer
from moeqjax.model.moe import expert_param_names
from moeqjax.model.moe_paths import moe_paths
from moeqjax.model.packed_weights import COLLECTION
from moeqjax.model.switch import switch_param_shapes
from moeqjax.model.projection_codes import (NUM_PROJECTIONS, PROJECTIONS, by_projection, collapse,
                                             layer_codes)
from moeqjax.quant import packed_tensor as pt
from moeqjax.quant.clip import learned_ratio

# output_guard recognises a pack folder by these (what `--overwrite` may replace).
FORMAT = output_guard.PACKED_FORMAT
FORMAT_VERSION = 1
MANIFEST = output_guard.PACKED_MANIFEST
TOKENIZER_FILE = TOKENIZER_JSON
FP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
_EXPERT_PARAMS = ("w_in", "w_gate", "w_out")
_CLIP_SUFFIX = "_clip"
DECODER_ONLY, SWITCH = "moe_transformer", "switch"  # the manifest's model_family
_FAMILIES = {DECODER_ONLY: (ModelConfig, MoETransformer), SWITCH: (SwitchConfig, SwitchTransformer)}
AnyConfig = ModelConfig | SwitchConfig


class PackedCheckpointError(ValueError):
  """A packed checkpoint that cannot be written or loaded as asked; the message names the file."""


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def _packed_arrays(cfg: AnyConfig, params, quant):
  """(param path, packed node or None, float array or None, codes) for every param, in tree order."""
  spec = cfg.quant.spec()
  for path, w in _flatten(params):
    name = path[-1]
    where = "/".join(path)
    if cfg.quant.has_ratio and name.endswith(_CLIP_SUFFIX) and name[:-len(_CLIP_SUFFIX)] in _EXPERT_PARAMS:
      continue  # folded into the stored scales of its weight
    w = np.asarray(jax.device_get(w), np.float32)
    if name in _EXPERT_PARAMS:
      codes = get_path(quant, path[:-1] + ("expert_bits",))
      if codes is None:
        raise PackedCheckpointError(f"{where} has no expert codes in the quant collection; pack a "
                                    "QAT student (params and its quant codes)")
      codes = layer_codes(np.asarray(jax.device_get(codes)), name)
      if np.any(codes == q.FP):
        raise PackedCheckpointError(
            f"{where}: expert(s) {np.flatnonzero(codes == q.FP).tolist()} have code 0 (full "
            "precision), which packing cannot store; give every expert a quantized code (1, 2, 3, 4, 8)")
      yield path, pt.pack_experts(w, codes, spec, learned_ratio(params, path, spec)), None, codes
      continue
    code = get_path(quant, path[:-1] + ("bits",)) if name == "kernel" else None
    if code is not None:
      code = int(np.asarray(jax.device_get(code)))
      if code == q.FP:
        raise PackedCheckpointError(
            f"{where} has code 0 (full precision) although its rule quantizes it; packing stores "
            "quantized tensors packed, so set the code back or set its rule to 0")
      yield path, pt.pack_matrix(w, code, spec), None, code
      continue
    yield path, None, w, None


def _tensor_name(path, *rest) -> str:
  return ".".join(path + rest)


def _sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def model_family(cfg: AnyConfig) -> str:
  """The manifest's model_family of a config: "switch" for a SwitchConfig, else "moe_transformer"."""
  return SWITCH if isinstance(cfg, SwitchConfig) else DECODER_ONLY


def build_model(cfg: AnyConfig):
  """The model of a config's family (MoETransformer or SwitchTransformer)."""
  return _FAMILIES[model_family(cfg)][1](cfg)


def model_config_from_record(record: dict, family: str = DECODER_ONLY) -> AnyConfig:
  """The config of a manifest's `model_config` (the inverse of dataclasses.asdict) for its family."""
  if family not in _FAMILIES:
    raise ValueError(f"unknown model_family {family!r}; this moeqjax reads {sorted(_FAMILIES)}")
  record = dict(record)
  rules = QuantRules(**record.pop("quant"))
  return _FAMILIES[family][0](**record, quant=rules)


def moe_blocks(cfg: AnyConfig) -> list[str]:
  """The MoE blocks' param paths ("layers_0/moe", "encoder/layers_1/moe", ...): one row each of
  the manifest's expert_codes, in that order."""
  return ["/".join(p) for p in moe_paths(_abstract_params(cfg), "router")]


def expert_names(cfg: AnyConfig) -> tuple[str, ...]:
  """The expert params of one MoE block: w_in, w_gate, w_out (SwiGLU) or w_in, w_out (ReLU)."""
  return expert_param_names(cfg.moe_config() if isinstance(cfg, SwitchConfig) else cfg)


def _expert_shapes(cfg: AnyConfig) -> dict:
  """One expert's [in, out] shape of each expert param the model has."""
  moe_cfg = cfg.moe_config() if isinstance(cfg, SwitchConfig) else cfg
  return {n: s for n, s in expert_shapes(moe_cfg).items() if n in expert_names(cfg)}


def _block_of(param: str) -> str:
  return param.rpartition("/")[0]


def pack(cfg: AnyConfig, params, quant, out_dir, *, fp_dtype: str = "float32",
         tokenizer: str | pathlib.Path | None = None, eos_id: int | None = None,
         overwrite: bool = False, source: str = "") -> dict:
  """Writes a packed checkpoint of a quantized student.

  Expert weights are stored packed at each expert's own code (one buffer per code present in a
  layer), quantized attention / shared expert / router / lm_head matrices at their code, and every
  other weight at `fp_dtype`. Learned clip ratios are folded into the stored scales. The folder is
  written under a temporary name and renamed at the end, so a killed pack leaves nothing that loads.
  With the default float32, the packed model computes what the fake-quant student computes.

  Args:
    cfg: the student's model config (its quant rules give the spec): a ModelConfig (decoder-only
      MoETransformer) or a SwitchConfig (SwitchTransformer); the manifest records which.
    params: the student's params.
    quant: the student's `quant` collection (codes); every expert must have a quantized code.
    out_dir: the folder to write; it must not exist, be empty, or (with `overwrite`) be a pack
      folder moeqjax wrote.
    fp_dtype: "float32" (default) or "bfloat16" (half the bytes of the unquantized weights; the
      packed model then differs from the fake-quant student by that rounding).
    tokenizer: a tokenizer.json (or its folder) to copy along, or None for byte-level models.
    eos_id: the end-of-text id generation stops at (None: never stops early).
    overwrite: replace a pack folder moeqjax wrote (anything else is refused: ConvertError).
    source: where the student came from (recorded in the manifest).

  Returns:
    The manifest (also written to out_dir/manifest.json), whose "bytes" section states the expert
    tensor bytes on disk next to `expert_bytes` from the memory accounting (they are equal).
  """
  if fp_dtype not in FP_DTYPES:
    raise PackedCheckpointError(f"fp_dtype={fp_dtype!r}; choose from {sorted(FP_DTYPES)}")
  out_dir = output_guard.check_output(out_dir, "packed", overwrite)
  tok_file = None
  if tokenizer:
    tok_file = pathlib.Path(tokenizer)
    tok_file = tok_file / TOKENIZER_FILE if tok_file.is_dir() else tok_file
    if not tok_file.is_file():
      raise PackedCheckpointError(f"tokenizer {tok_file} does not exist")
  # The tokenizer's companions (its eos_token, special tokens) travel with it, for exports.
  companions = [f.name for f in tokenizer_files(tok_file)[1:]] if tok_file else []

  tensors, records, expert_codes = [], {}, {}
  expert_tensor_bytes = 0
  for path, node, w, codes in _packed_arrays(cfg, params, quant):
    param = "/".join(path)
    if node is None:
      arr = w.astype(FP_DTYPES[fp_dtype])
      tensors.append((_tensor_name(path), arr))
      records[_tensor_name(path)] = {"param": param, "role": "float"}
      continue
    if path[-1] in _EXPERT_PARAMS:
      expert_codes[param] = codes.tolist()
    for key, bufs in node.items():
      if key in (pt.EXPERT_CODES, pt.EXPERT_SLOT):
        continue
      for role, arr in bufs.items():
        name = _tensor_name(path, key, role)
        tensors.append((name, arr))
        records[name] = {"param": param, "role": role, "code": pt.code_of_key(key)}
        if path[-1] in _EXPERT_PARAMS:
          expert_tensor_bytes += arr.nbytes

  # [L, E] when every expert's matrices share its code, else [L, 3, E] (PROJECTIONS rows; a ReLU
  # expert has no w_gate, whose row repeats w_in's).
  codes_LxE = collapse(np.stack([
      [expert_codes.get(f"{block}/{w}", expert_codes[f"{block}/w_in"]) for w in PROJECTIONS]
      for block in moe_blocks(cfg)], axis=0))
  shapes = _expert_shapes(cfg)
  accounting = q.expert_bytes(
      shapes, {w: c for w, c in by_projection(codes_LxE).items() if w in shapes}, cfg.quant.spec())
  if accounting["total_bytes"] != expert_tensor_bytes:  # the packers and the formula must agree
    raise AssertionError(f"packed expert bytes {expert_tensor_bytes} != accounted "
                         f"{accounting['total_bytes']}; a packing/accounting bug")
  for name, arr in tensors:
    records[name].update({"shape": list(arr.shape), "dtype": dtype_name(arr.dtype),
                          "nbytes": int(arr.nbytes), "sha256": _sha256(arr), "file": SINGLE_FILE})
  total = sum(int(a.nbytes) for _, a in tensors)
  manifest = {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "source": source,
      "model_family": model_family(cfg),
      "model_config": dataclasses.asdict(cfg),
      "fp_dtype": fp_dtype,
      "scale_dtype": np.dtype(pt.SCALE_DTYPES[cfg.quant.scale_bytes]).name,
      "tokenizer": TOKENIZER_FILE if tok_file else "bytes",
      "tokenizer_files": companions,
      "eos_id": eos_id,
      "expert_codes": codes_LxE.tolist(),
      "bytes": {
          "expert_tensors_on_disk": expert_tensor_bytes,
          "expert_bytes_accounted": accounting["total_bytes"],
          "expert_bits_per_weight": accounting["bits_per_weight"],
          "expert_code_bits": accounting["avg_code_bits"],
          "other_tensors": total - expert_tensor_bytes,
          "all_tensors": total,
      },
      "tensors": records,
  }
  tmp = output_guard.temp_folder(out_dir)
  try:
    writer = StreamingWriter(tmp / SINGLE_FILE, [(n, a.shape, a.dtype) for n, a in tensors],
                             metadata={"format": FORMAT})
    try:
      for name, arr in tensors:
        writer.write(name, arr)
    finally:
      writer.close()
    if tok_file:
      copy_tokenizer(tok_file, tmp)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
  except BaseException:
    output_guard.discard(tmp)
    raise
  output_guard.replace(tmp, out_dir, "packed", overwrite)
  return manifest


@dataclasses.dataclass
class PackedModel:
  """A packed checkpoint in device memory: apply `model` to `variables` (params + packed)."""

  cfg: AnyConfig
  model: MoETransformer | SwitchTransformer
  variables: dict
  manifest: dict
  folder: pathlib.Path

  @property
  def tokenizer_path(self) -> str:
    """"" for bytes, else the checkpoint's tokenizer.json."""
    tok = self.manifest["tokenizer"]
    return "" if tok == "bytes" else str(self.folder / tok)


def _read_manifest(folder: pathlib.Path) -> dict:
  path = folder / MANIFEST
  if not path.is_file():
    raise PackedCheckpointError(f"{folder} is not a packed checkpoint (no {MANIFEST}); make one "
                                "with `moeqjax pack`")
  try:
    manifest = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise PackedCheckpointError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
  if manifest.get("format") != FORMAT:
    raise PackedCheckpointError(f"{path} is not a {FORMAT} manifest (format={manifest.get('format')!r})")
  if manifest.get("format_version") != FORMAT_VERSION:
    raise PackedCheckpointError(
        f"{path} has format_version {manifest.get('format_version')!r}; this moeqjax reads version "
        f"{FORMAT_VERSION}; re-pack the student with this version (`moeqjax pack`)")
  return manifest


def _abstract_params(cfg: AnyConfig) -> dict:
  if isinstance(cfg, SwitchConfig):
    return switch_param_shapes(cfg)
  abstract = jax.eval_shape(MoETransformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  return nn.meta.unbox(abstract["params"])


def param_shapes(cfg: AnyConfig) -> dict:
  """{"layers_0/moe/w_in": shape, ...} of every param of the model (no allocation)."""
  return {"/".join(p): tuple(v.shape) for p, v in _flatten(_abstract_params(cfg))}


def _expected_shapes(cfg: AnyConfig, manifest: dict) -> dict:
  """The shape every tensor of the manifest must have, derived from the config alone."""
  spec = cfg.quant.spec()
  shapes = param_shapes(cfg)
  one_expert = _expert_shapes(cfg)
  row = {block: i for i, block in enumerate(moe_blocks(cfg))}
  codes = np.asarray(manifest["expert_codes"])
  if np.shape(codes) not in ((len(row), cfg.num_experts),
                             (len(row), NUM_PROJECTIONS, cfg.num_experts)):
    raise PackedCheckpointError(
        f"manifest expert_codes has shape {list(np.shape(codes))}, the model config needs "
        f"[MoE blocks, num_experts] = {[len(row), cfg.num_experts]} (or one row per "
        "projection)")
  stored = {(rec["param"], rec["role"], rec.get("code")) for rec in manifest["tensors"].values()}
  for param in shapes:
    if cfg.quant.has_ratio and param.endswith(_CLIP_SUFFIX):
      continue  # folded into the scales
    leaf = param.split("/")[-1]
    if leaf in one_expert:
      layer = row[_block_of(param)]
      needed = [(param, role, c) for c in set(layer_codes(codes[layer], leaf).tolist())
                for role in ("values", "scales")]
    elif any(p == param for p, _, _ in stored):
      continue
    else:
      needed = [(param, "float", None)]
    missing = [n for n in needed if n not in stored]
    if missing:
      raise PackedCheckpointError(
          f"the manifest has no {missing[0][1]} tensor for {param}"
          + (f" at code {missing[0][2]}" if missing[0][2] is not None else "")
          + "; the checkpoint is incomplete, re-pack it")
  want = {}
  for name, rec in manifest["tensors"].items():
    param = rec["param"]
    if param not in shapes:
      raise PackedCheckpointError(f"tensor {name}: this model config has no param {param}")
    full = shapes[param]
    if rec["role"] == "float":
      want[name] = full
      continue
    code = rec["code"]
    if param.split("/")[-1] in one_expert:
      layer = row[_block_of(param)]
      n = int(np.sum(layer_codes(codes[layer], param.split("/")[-1]) == code))
      matrix, lead = full[1:], (n,)
    else:
      matrix, lead = full, ()
    count = matrix[0] * matrix[1]
    if rec["role"] == "values":
      want[name] = lead + (pt.value_bytes(code, count, spec),)
    else:
      want[name] = lead + tuple(q.scale_shape(matrix, spec))
  return want


def open_packed(folder) -> tuple[dict, AnyConfig]:
  """(manifest, model config) of a packed checkpoint, checked; a one-line PackedCheckpointError else.

  The config is a ModelConfig or a SwitchConfig, as the manifest's model_family says.
  """
  folder = pathlib.Path(folder)
  manifest = _read_manifest(folder)
  try:
    cfg = model_config_from_record(manifest["model_config"],
                                   manifest.get("model_family", DECODER_ONLY))
  except (TypeError, ValueError, KeyError) as e:
    raise PackedCheckpointError(f"{folder / MANIFEST}: bad model_config ({e})") from None
  return manifest, cfg


def read_packed_tensors(folder, manifest: dict, cfg: AnyConfig, *, verify: bool = True):
  """Yields (name, manifest record, host numpy array) for every tensor of a packed checkpoint.

  Every tensor is checked against the manifest (present, shape, dtype, bytes and, with `verify`,
  sha256) and against the shapes its model config implies, before it is yielded.

  Raises:
    PackedCheckpointError: naming the file or tensor, for any mismatch.
  """
  folder = pathlib.Path(folder)
  want = _expected_shapes(cfg, manifest)
  headers = {}
  for name, rec in manifest["tensors"].items():
    file = folder / rec["file"]
    if rec["file"] not in headers:
      if not file.is_file():
        raise PackedCheckpointError(f"{file} is missing; the manifest lists tensors in it")
      try:
        headers[rec["file"]] = read_header(file)
      except ValueError as e:
        raise PackedCheckpointError(f"{file}: {e}") from None
    info = headers[rec["file"]].get(name)
    if info is None:
      raise PackedCheckpointError(f"tensor {name} is missing from {file.name}")
    if (list(info.shape) != rec["shape"] or dtype_name(info.dtype) != rec["dtype"]
        or info.nbytes != rec["nbytes"]):
      raise PackedCheckpointError(
          f"tensor {name} in {file.name} is {dtype_name(info.dtype)}{list(info.shape)}, the manifest "
          f"says {rec['dtype']}{rec['shape']}")
    if tuple(rec["shape"]) != want[name]:
      raise PackedCheckpointError(
          f"{folder}: tensor {name} has shape {rec['shape']}, but the manifest's model config "
          f"implies {list(want[name])}; the manifest and the tensors disagree (repack it)")
    try:
      arr = read_tensor(info)
    except ValueError as e:
      raise PackedCheckpointError(f"tensor {name}: {e}") from None
    if verify and _sha256(arr) != rec["sha256"]:
      raise PackedCheckpointError(f"tensor {name} in {file.name} fails its sha256 check (corrupted "
                                  "file); re-pack or re-copy the checkpoint")
    yield name, rec, arr


def load_packed(folder, *, verify: bool = True) -> PackedModel:
  """Loads a packed checkpoint, keeping quantized weights packed in device memory.

  Every tensor is checked against the manifest (present, shape, dtype, bytes and, with `verify`,
  sha256) and against the shapes its model config implies.

  Args:
    folder: a folder written by `pack`.
    verify: check each tensor's sha256 (reads every byte once more; on by default).

  Returns:
    A PackedModel; `model.apply(variables, tokens)` runs the packed decoder-only student, and
    `model.apply(variables, encoder_ids, decoder_ids)` (or `serve.switch_greedy(model,
    variables, ...)`) a packed Switch student.

  Raises:
    PackedCheckpointError: naming the file or tensor, for any mismatch.
  """
  folder = pathlib.Path(folder)
  manifest, cfg = open_packed(folder)
  params, packed, experts = {}, {}, {}
  for _, rec, arr in read_packed_tensors(folder, manifest, cfg, verify=verify):
    path = tuple(rec["param"].split("/"))
    if rec["role"] == "float":
      _set(params, path, jax.device_put(arr))
    elif path[-1] in _EXPERT_PARAMS:  # laid out as a bank below, then put on the device
      _set(experts, path + (pt.code_key(rec["code"]), rec["role"]), arr)
    else:
      _set(packed, path + (pt.code_key(rec["code"]), rec["role"]), jax.device_put(arr))
    del arr
  spec, shapes = cfg.quant.spec(), _expert_shapes(cfg)
  for block, row in zip(moe_blocks(cfg), manifest["expert_codes"]):
    for w in shapes:
      path = tuple(block.split("/")) + (w,)
      codes = layer_codes(np.asarray(row, np.int32), w)
      slot = np.zeros_like(codes)
      for c in set(codes.tolist()):
        slot[codes == c] = np.arange(int(np.sum(codes == c)))
      node = get_path(experts, path)
      node.update({pt.EXPERT_CODES: codes, pt.EXPERT_SLOT: slot})
      bank = pt.expert_bank(node, spec, shapes[w])
      _set(packed, path, jax.device_put(bank))
      _set(experts, path, None)  # free the host copy as we go
  return PackedModel(cfg, build_model(cfg), {"params": params, COLLECTION: packed}, manifest,
                     folder)


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value
