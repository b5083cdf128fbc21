"""Export of a quantized student as a compressed-tensors `pack-quantized` HF checkpoint (vLLM), from our codes."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json

import numpy as np

from moeqjax.convert import ct_pack, ct_scheme, layout, output_guard
from moeqjax.convert.errors import ConvertError
from moeqjax.convert.gguf_export import _moeqjax_bytes
from moeqjax.convert.hf_config import family_of, model_config_to_hf_config
from moeqjax.convert.hf_import import NP_DTYPES
from moeqjax.convert.safetensors_io import SINGLE_FILE, StreamingWriter
from moeqjax.convert.student_weights import EXPERT_PARAMS as _EXPERT_PARAMS
from moeqjax.convert.student_weights import ParamWeights, StudentWeights
from moeqjax.convert.switch_hf_config import MODEL_TYPE as SWITCH_MODEL_TYPE
from moeqjax.convert.switch_hf_config import switch_config_to_hf_config
from moeqjax.convert.switch_layout import UNTIED_SHARED, switch_entries
from moeqjax.model import ModelConfig, SwitchConfig
from moeqjax.quant import formats
from moeqjax.quant import granularity as gran

REPORT = "export_report.json"
KIND = "compressed-tensors"  # output_guard's name for what this writes
DTYPES = ("float32", "bfloat16")
_BF16_BYTES = 2  # moeqjax keeps full-precision weights in bf16
# Scales are written as float32 holding fp16-exact values: compressed-tensors dequantizes in the
# scale's dtype, so fp16 scales would round q * s (e.g. 7 * s needs 14 significant bits).
SCALE_DTYPE = np.dtype(np.float32)


@dataclasses.dataclass
class _Module:
  """One param path of ours and how its HF tensors are stored."""

  path: tuple[str, ...]
  ents: list  # layout.Entry, one per expert (or one)
  codes: np.ndarray | None
  mode: str  # "packed", "float" (unquantized) or "dequantized" (quantized, stored float32)
  bits: int = 0
  folded: bool = False  # asymmetric levels written symmetric as q - z (ct_scheme.fold_zero_points)
  note: str = ""

  @property
  def zero_points(self) -> bool:
    return self.mode == "packed" and not self.folded


def _packable_dense(path) -> bool:
  # vLLM builds the routers, Qwen2-MoE's shared_expert_gate and the lm_head without a quant
  # method, so those are stored dequantized even when quantized.
  return path[-1] == "kernel" and path[-2] not in ("router", "gate") and path[0] != "lm_head"


def _module_name(ent) -> str:
  return ent.hf_name[:-len(".weight")]


def plan(weights: StudentWeights, ents, one_linear_per_expert: bool = False) -> list[_Module]:
  """Every param path of `ents` (layout.Entry, in writing order) with its storage mode.

  By default the expert and dense widths are shared (ct_scheme: one scheme for the experts, as
  transformers' fused experts and vLLM need, one for the dense matrices) and asymmetric experts
  are written symmetric as q - z (fused experts drop zero points). `one_linear_per_expert`
  (Switch): transformers 5.x decompresses every unfused Linear with one scheme (its "dense"
  config group), so every packed matrix shares the narrowest width that holds all their codes
  (`ct_scheme.native_bits`: 2 bits when all are ternary or int2), zero points kept.
  """
  cfg, mods = weights.cfg, []
  for path, group in itertools.groupby(ents, key=lambda e: e.path):
    codes = weights.codes(path)
    mode = "float" if codes is None else "packed"
    mod = _Module(path, list(group), codes, mode)
    if codes is not None and path[-1] in _EXPERT_PARAMS and np.any(codes == formats.FP):
      mod.mode, mod.note = "dequantized", ("some experts are full precision: the layer's experts "
                                           "are float32 and unquantized in the runtime")
    elif codes is not None and path[-1] == "kernel" and not _packable_dense(path):
      mod.mode, mod.note = "dequantized", ("vLLM has no quantized form of this layer: stored "
                                           "dequantized in float32 (exact)")
    mods.append(mod)
  if one_linear_per_expert:
    packed = [m for m in mods if m.mode == "packed"]
    bits = max((ct_scheme.native_bits(c) for m in packed for c in np.ravel(m.codes)), default=0)
    for m in packed:
      m.bits = bits
    return mods
  for experts in (True, False):
    packed = [m for m in mods if m.mode == "packed" and (m.path[-1] in _EXPERT_PARAMS) == experts]
    if packed:
      codes = np.concatenate([np.ravel(m.codes) for m in packed])
      folded = experts and ct_scheme.fold_zero_points(cfg.quant.spec(), codes, "the experts")
      bits = ct_scheme.container_bits(codes, folded)
      for m in packed:
        m.bits, m.folded = bits, folded
  return mods


def _tensor_specs(mod: _Module, spec, float_dtype) -> list[tuple[str, tuple, np.dtype]]:
  """(name, shape, dtype) of the safetensors entries of one module, in writing order."""
  out = []
  for ent in mod.ents:
    if mod.mode != "packed":
      dtype = np.dtype(np.float32) if mod.mode == "dequantized" else float_dtype
      out.append((ent.hf_name, ent.hf_shape, dtype))
      continue
    n_out, n_in = ent.hf_shape
    groups = n_in // spec.group_size if spec.granularity == "group" else 1
    name = _module_name(ent)
    out.append((f"{name}.weight_packed", (n_out, -(-n_in * mod.bits // 32)), np.dtype(np.int32)))
    out.append((f"{name}.weight_scale", (n_out, groups), SCALE_DTYPE))
    out.append((f"{name}.weight_shape", (2,), np.dtype(np.int64)))
    if not spec.symmetric and mod.zero_points:
      out.append((f"{name}.weight_zero_point", (-(-n_out * mod.bits // 32), groups),
                  np.dtype(np.int32)))
  return out


def _check_scales(scales, mod: _Module):
  """Refuses scales that fp16 (the runtime's scale dtype) does not hold exactly."""
  exact = np.asarray(scales, np.float32).astype(np.float16).astype(np.float32) == scales
  if not np.all(exact):
    e = int(np.argwhere(~exact)[0][0]) if mod.codes.ndim else 0
    name = _module_name(mod.ents[e if len(mod.ents) > 1 else 0])
    raise ConvertError(f"tensor {name}: scale {float(scales[~exact][0])!r} is not exact in "
                       "float16, which vLLM holds scales in; retrain with quant.scale_bytes=2 "
                       "(fp16 scales)")


def _packed_arrays(weights: StudentWeights, mod: _Module, spec):
  """Yields the packed tensors of one quantized param (every expert), in `_tensor_specs` order."""
  form = weights.ints(mod.path)  # [..., in, out], [..., ng, out]
  q, scales, zp = form.q, form.scales, form.zero_points
  w_shape = tuple(weights.shape(mod.path))
  _check_scales(scales, mod)
  lead = w_shape[:-2]
  codes = np.broadcast_to(mod.codes, lead)
  # Tensor granularity has one scale per matrix; the format gets it repeated per output channel.
  scales = np.broadcast_to(scales, lead + (scales.shape[-2], w_shape[-1]))
  q = q.astype(np.int32)
  if zp is not None and mod.folded:
    per_weight = gran.grouped_shape(w_shape, spec)
    zp_w = np.broadcast_to(gran.scales_to_stats(zp, w_shape, spec), per_weight).reshape(w_shape)
    q, zp = q - zp_w.astype(np.int32), None
  elif zp is not None:
    zp = np.broadcast_to(zp, scales.shape).astype(np.int32)
    # Our asymmetric levels are unsigned [0, 2^b - 1]; the signed container keeps q - z when both
    # move down by 2^(bits-1). Ternary groups are symmetric (z = 0) and stay.
    shift = np.where(codes == formats.TERNARY, 0, 1 << (mod.bits - 1)).astype(np.int32)
    q = q - shift[..., None, None]
    zp = zp - shift[..., None, None]
  for i, ent in enumerate(mod.ents):
    idx = (ent.expert,) if ent.expert is not None else ()
    yield ct_pack.pack_rows(q[idx].T, mod.bits)
    yield np.ascontiguousarray(scales[idx].T).astype(SCALE_DTYPE)
    yield np.asarray(ent.hf_shape, np.int64)
    if zp is not None:
      yield ct_pack.pack_columns(zp[idx].T, mod.bits)


def _float_arrays(weights: StudentWeights, mod: _Module, float_dtype):
  w = weights.dequantized(mod.path)
  # A quantized weight stored as floats is exact only in float32.
  dtype = np.dtype(np.float32) if mod.mode == "dequantized" else float_dtype
  for ent in mod.ents:
    a = w[ent.expert] if ent.expert is not None else w
    yield np.ascontiguousarray(a.T if ent.transpose else a).astype(dtype)


def _row(mod: _Module, spec, nbytes: int, ternary_packing: str) -> dict:
  ent = mod.ents[0]
  name = _module_name(ent) if ent.hf_name.endswith(".weight") else ent.hf_name
  if ent.expert is not None:
    name = name.replace(f".experts.{ent.expert}.", ".experts.*.").replace(
        f".experts.expert_{ent.expert}.", ".experts.expert_*.")  # Switch names its experts
  shape = (len(mod.ents),) + tuple(ent.hf_shape) if ent.expert is not None else ent.hf_shape
  if mod.codes is None:
    codes = {"fp": len(mod.ents)}
    ours = _BF16_BYTES * int(np.prod(shape))
  else:
    codes = ct_scheme.summary(mod.codes)
    lead = (len(mod.ents),) if ent.expert is not None else ()
    ours = _moeqjax_bytes(lead + tuple(ent.hf_shape[::-1]), mod.codes, spec)
  container = f"int{mod.bits}" if mod.mode == "packed" else (
      "float32" if mod.mode == "dequantized" else None)
  note = mod.note
  if mod.mode == "packed":
    note = ct_scheme.widening_note(codes, mod.bits, ternary_packing)
  return {"name": name, "codes": codes, "container": container, "shape": list(shape),
          "moeqjax_bytes": int(ours), "file_bytes": int(nbytes), "note": note}


def switch_ct_entries(cfg: SwitchConfig) -> list:
  """The Switch checkpoint's tensors (switch_layout), with `shared.weight` of an untied model."""
  ents = switch_entries(cfg)
  if not cfg.tie_embeddings:  # never read by transformers: the encoder's embedding, as in export_hf_switch
    name, path = UNTIED_SHARED
    ents.append(layout.Entry(path, None, name, (cfg.vocab_size, cfg.d_model), False))
  return ents


def export_compressed_tensors(cfg: ModelConfig | SwitchConfig, params, quant, out_dir,
                              family_config_json: dict | None = None, dtype: str = "float32",
                              **options) -> dict:
  """`write_compressed_tensors` of a student given as params and its `quant` collection."""
  return write_compressed_tensors(ParamWeights(cfg, params, quant), out_dir, family_config_json,
                                  dtype, **options)


def write_compressed_tensors(weights: StudentWeights, out_dir,
                             family_config_json: dict | None = None, dtype: str = "float32", *,
                             model_type: str | None = None, overwrite: bool = False,
                             extra_files: dict | None = None) -> dict:
  """Writes a HF-layout checkpoint whose quantized Linear weights are compressed-tensors packed ints.

  Quantized weights are written from the student's integer codes and scales (`weights.ints`: from
  params via `quantize_to_ints`, or a packed checkpoint's stored codes), so `weight_packed` /
  `weight_scale` (/ `weight_zero_point`) decompress to the student's weights bit for bit. One
  width (int4 or int8, the narrowest exact) holds every expert of the model, another every packed
  dense matrix; `export_report.json` says what that costs against our packing. The folder also
  holds output_guard.MARKER, which lets a later export with `overwrite` replace it.

  A Switch student (weights.cfg a SwitchConfig) is written as switch_transformers, one
  compressed nn.Linear per expert (`...mlp.experts.expert_{j}.wi/wo`). transformers decompresses
  every such Linear with one config group, so all its packed matrices share one width, the
  narrowest that holds every code (see `plan`), and keep their zero points.

  Args:
    weights: the student (its cfg must fit a HF family layout, or be a SwitchConfig).
    out_dir: the folder to write (built under a temporary name, then renamed); it must not exist,
      be empty, or (with `overwrite`) be a compressed-tensors export moeqjax wrote.
    family_config_json: the original HF config.json (keeps token ids and metadata); optional.
    dtype: "float32" (default: transformers' logits equal ours within 1e-5) or "bfloat16" for
      unquantized tensors; scales are float32 with fp16-exact values, weights quantized but not
      packable are float32.
    model_type: the HF family; default from family_config_json, else inferred from cfg.
    overwrite: replace a compressed-tensors folder moeqjax wrote (anything else is refused).

  Returns:
    The report (also written as export_report.json inside the folder).

  Raises:
    ConvertError: an existing output it may not replace, a layout no HF family fits, a group
      size vLLM cannot run, or a scale float16 does not hold exactly (one line each).
  """
  if dtype not in DTYPES:
    raise ConvertError(f"dtype={dtype!r}; choose from {DTYPES}")
  out_dir = output_guard.check_output(out_dir, KIND, overwrite)
  cfg = weights.cfg
  switch = isinstance(cfg, SwitchConfig)
  if switch:
    if model_type not in (None, SWITCH_MODEL_TYPE):
      raise ConvertError(f"model_type={model_type!r}: a Switch student exports as "
                         f"{SWITCH_MODEL_TYPE!r} only")
    hf_config = switch_config_to_hf_config(cfg, family_config_json, dtype)
    mods = plan(weights, switch_ct_entries(cfg), one_linear_per_expert=True)
  else:
    hf_config = model_config_to_hf_config(cfg, model_type, family_config_json, dtype)
    mods = plan(weights, layout.entries(cfg, family_of(hf_config)))
  spec = cfg.quant.spec()
  packed = [m for m in mods if m.mode == "packed"]
  if packed and not switch:  # vLLM's constraint; transformers decompresses any group size
    ct_scheme.check_group_size(spec)
  float_dtype = NP_DTYPES[dtype]
  experts = [m for m in packed if m.path[-1] in _EXPERT_PARAMS]
  dense = [m for m in packed if m.path[-1] == "kernel"]
  linear = [m for m in mods if m.path[-1] in _EXPERT_PARAMS + ("kernel",)]
  ignore = [_module_name(e) for m in linear if m.mode != "packed" for e in m.ents]
  if switch:
    hf_config["quantization_config"] = ct_scheme.module_group_config(
        spec, packed[0].bits if packed else None, [_module_name(e) for m in packed for e in m.ents],
        ignore)
  else:
    hf_config["quantization_config"] = ct_scheme.quantization_config(
        spec, experts[0].bits if experts else None, bool(experts) and experts[0].folded,
        [_module_name(e) for m in dense for e in m.ents], dense[0].bits if dense else None,
        ignore)
  specs = [_tensor_specs(m, spec, float_dtype) for m in mods]
  rows = []
  with output_guard.building_folder(out_dir, KIND, overwrite, extra_files) as tmp:
    writer = StreamingWriter(tmp / SINGLE_FILE, [s for ss in specs for s in ss])
    try:
      for mod, mod_specs in zip(mods, specs):
        arrays = (_packed_arrays(weights, mod, spec) if mod.mode == "packed"
                  else _float_arrays(weights, mod, float_dtype))
        nbytes = 0
        for (name, _, _), a in zip(mod_specs, arrays):
          writer.write(name, a)
          nbytes += a.nbytes
        rows.append(_row(mod, spec, nbytes, spec.ternary_packing))
    except BaseException:
      with contextlib.suppress(ValueError):  # closes the file; the count check is moot now
        writer.close()
      raise
    writer.close()  # raises if a module yielded fewer tensors than its specs
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    file_bytes = (tmp / SINGLE_FILE).stat().st_size
    notes = [f"{r['name']}: {r['note']}" for r in rows if r["note"]]
    notes.append("scales are float32 holding fp16-exact values: serve in float16 to keep them "
                 "exact (bfloat16 rounds them)")
    report = {
        "format": "compressed-tensors", "writer": output_guard.WRITER,
        "compressed_tensors_format": ct_scheme.FORMAT,
        "model_type": hf_config["model_type"], "dtype": dtype, "scale_dtype": "float32 (fp16-exact)",
        "expert_container": f"int{experts[0].bits}" if experts else None,
        "dense_container": f"int{dense[0].bits}" if dense else None,
        "tensors": rows,
        "moeqjax_bytes": sum(r["moeqjax_bytes"] for r in rows),
        "tensor_bytes": sum(r["file_bytes"] for r in rows),
        "file_bytes": file_bytes, "notes": notes,
    }
    (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n")
  return report
