"""Export of a quantized student to one GGUF file for llama.cpp, from our integer codes (nothing re-quantized)."""

from __future__ import annotations

import json

import numpy as np

from moeqjax.convert import gguf_arch, gguf_container, gguf_requant, output_guard
from moeqjax.convert.errors import ConvertError
from moeqjax.convert.gguf_vocab import Vocab, add_vocab, bpe_vocab, byte_vocab
from moeqjax.convert.student_weights import IntForm, ParamWeights, StudentWeights
from moeqjax.model import ModelConfig, SwitchConfig
from moeqjax.quant import code_name, formats, weight_bytes
from moeqjax.quant import granularity as gran

KIND = "gguf"  # output_guard's name for what this writes
FP_DTYPES = ("f32", "f16", "bf16")
_BF16_BYTES = 2  # moeqjax keeps full-precision weights in bf16
# The exact container our own packing corresponds to, per code (what the allocation paid for).
_NATURAL = {"ternary": ("TQ2_0", "TQ1_0"), "int2": ("Q4_0",), "int3": ("Q4_0",),
            "int4": ("Q4_0", "Q4_1"), "int8": ("Q8_0",)}


def _to_ggml(a, kind: str, permute_heads: int):
  """Our array -> numpy in ggml orientation ([..., out, in]), Q/K rows permuted for llama's rope."""
  a = np.asarray(a)
  if kind in ("kernel", "experts"):
    a = np.swapaxes(a, -1, -2)
  elif kind == "gate_vector":
    a = a.reshape(-1)
  if permute_heads:
    # Our rope pairs dim i with i + A/2 (half-split); llama's pairs 2i with 2i + 1, so within each
    # head the rows [x_0..x_{A/2-1}, y_0..] become [x_0, y_0, x_1, y_1, ...].
    n, rest = a.shape[0], a.shape[1:]
    a = a.reshape(permute_heads, 2, n // permute_heads // 2, *rest).swapaxes(1, 2).reshape(a.shape)
  return np.ascontiguousarray(a)


def int_form(form: IntForm, spec, shape):
  """Per-weight integer levels and scales of a quantized weight, in our layout.

  Args:
    form: its integer form (q, scales, zero points; see student_weights.IntForm).
    spec: the QuantSpec.
    shape: the weight's shape [..., in, out].

  Returns:
    (levels int32 [..., in, out] = q - zero_point, scale float32 [..., in, out]); levels * scale
    is the student's dequantized weight exactly.
  """
  shape = tuple(shape)
  grouped = gran.grouped_shape(shape, spec)

  def per_weight(v):
    return np.broadcast_to(gran.scales_to_stats(v, shape, spec), grouped).reshape(shape)

  levels = np.asarray(form.q).astype(np.int32)
  if form.zero_points is not None:
    levels = levels - per_weight(form.zero_points.astype(np.int32))
  return levels, per_weight(form.scales).astype(np.float32)


def _float_data(a, dtype: str):
  """(numpy data, raw ggml type or None) of a float tensor at f32 / f16 / bf16."""
  import gguf
  a = np.asarray(a, np.float32)
  if dtype == "f32":
    return a, None
  if dtype == "f16":
    return a.astype(np.float16), None
  return gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16


def _codes_summary(codes) -> dict:
  names, counts = np.unique([code_name(int(c)) for c in np.ravel(codes)], return_counts=True)
  return {str(n): int(c) for n, c in zip(names, counts)}


def _moeqjax_bytes(shape, codes, spec) -> int:
  """Bytes moeqjax's packed checkpoint spends on this tensor (per leading index at its code)."""
  codes = np.broadcast_to(np.asarray(codes), tuple(shape[:-2]))
  inner = tuple(shape[-2:])
  return int(sum(weight_bytes(inner, int(c), spec) for c in np.ravel(codes)))


def _quantized_tensor(ent, form: IntForm, shape, codes, spec, order, requantize_mixed=None):
  """(data, raw_type, qtype name, note, extra report fields) for a weight quantized at `codes`."""
  import gguf
  name = ent.name
  levels, scale = int_form(form, spec, shape)
  levels = _to_ggml(levels, ent.kind, ent.permute_heads)
  scale = _to_ggml(scale, ent.kind, ent.permute_heads)
  kinds = _codes_summary(codes)
  start = order[0] if "ternary" in kinds and len(kinds) == 1 else "Q4_0"
  enc, skipped = gguf_container.encode_exact(levels, scale, order, start)
  if enc is None:
    why = "; ".join(f"{t}: {r}" for t, r in skipped.items())
    raise ConvertError(f"tensor {name} ({', '.join(kinds)}) fits no exact GGUF block type ({why})")
  notes = [f"{t} not exact: {r}" for t, r in skipped.items()]
  if len(kinds) > 1:
    notes.append(f"mixed codes {sorted(kinds)} share one ggml type (llama.cpp has one type per "
                 "tensor)")
  wider = [k for k in kinds if enc.qtype not in _NATURAL[k]]
  if wider:
    notes.append(f"{enc.qtype} is wider than the container of {', '.join(sorted(wider))}")
  if any(k in kinds for k in ("int2", "int3")):
    notes.append("ggml has no exact 2/3-bit type: int2/int3 are stored as 4-bit levels")
  data, qtype, extra = enc.data, enc.qtype, {"widened": bool(wider)}
  if (requantize_mixed and len(kinds) > 1 and ent.kind == "experts"
      and order.index(requantize_mixed) < order.index(qtype)):
    data, redone, rel = gguf_requant.requantize(name, levels, scale, requantize_mixed)
    extra = {"widened": False,
             "requantized": {"from": qtype, "experts": redone, "rel_error": rel}}
    notes.append(f"re-quantized experts {redone} from exact {qtype} to {requantize_mixed} "
                 f"(--requantize-mixed): relative error {rel:.3g}")
    qtype = requantize_mixed
  return data, gguf.GGMLQuantizationType[qtype], qtype, "; ".join(notes), extra


def report_path(out_path):
  """Where the report of the GGUF file `out_path` goes: FILE.gguf -> FILE.export_report.json."""
  return output_guard.report_path(out_path)


SWITCH_REFUSAL = ("GGUF has no Switch Transformer MoE architecture (llama.cpp's t5 has dense "
                  "FFNs only), so a Switch student cannot be exported to GGUF; export it with "
                  "--format compressed-tensors or hf (transformers loads both)")


def export_gguf(cfg: ModelConfig, params, quant, out_path, **options) -> dict:
  """`write_gguf` of a student given as params and its `quant` collection (None: unquantized)."""
  return write_gguf(ParamWeights(cfg, params, quant), out_path, **options)


def write_gguf(weights: StudentWeights, out_path, *, fp_dtype: str = "f32", all_f32: bool = False,
               tokenizer=None, name: str = "moeqjax-student", overwrite: bool = False,
               requantize_mixed: str | None = None) -> dict:
  """Writes the student as one GGUF file that llama.cpp loads, and its report beside it.

  Quantized weights are written from the student's integer codes and scales (`weights.ints`: from
  params via `quantize_to_ints`, or a packed checkpoint's stored codes) in the narrowest ggml block
  type that holds them exactly, so the file dequantizes to the student's weights bit for bit.
  Norms, biases and the (unquantized) router are float32; other unquantized weights are at
  `fp_dtype`. The metadata key output_guard.GGUF_KEY marks the file as moeqjax's, so a later
  export with `overwrite` may replace it.

  Args:
    weights: the student (its cfg's fields choose the llama.cpp architecture, see
      gguf_arch.arch_for).
    out_path: the .gguf file to write (written to a temporary name, then renamed); it must not
      exist, or (with `overwrite`) be a GGUF moeqjax wrote.
    fp_dtype: "f32", "f16" or "bf16" for unquantized matrices.
    all_f32: write every tensor, quantized ones dequantized, as float32 (a control).
    tokenizer: None for our byte vocabulary, else a HF tokenizer.json (or its folder).
    name: general.name.
    overwrite: replace a GGUF file (and its report) moeqjax wrote; anything else is refused.
    requantize_mixed: None (default: nothing re-quantized), or "TQ2_0", "TQ1_0" or "Q4_0": store
      expert tensors with mixed codes at this type when it is narrower than their exact container,
      re-quantizing the experts it cannot hold exactly; their rows report the relative error.

  Returns:
    The report (also written next to the file as `report_path(out_path)`, FILE.export_report.json,
    so exports into one folder keep one report each).

  Raises:
    ConvertError: a Switch student (SWITCH_REFUSAL), an existing output it may not replace, no
      matching architecture, or a tensor no exact type holds.
  """
  if isinstance(weights.cfg, SwitchConfig):  # refused before anything is read or written
    raise ConvertError(SWITCH_REFUSAL)
  import gguf
  if fp_dtype not in FP_DTYPES:
    raise ConvertError(f"fp_dtype={fp_dtype!r}; choose from {FP_DTYPES}")
  gguf_requant.check_type(requantize_mixed)
  out_path = output_guard.check_output(out_path, KIND, overwrite)
  cfg = weights.cfg
  arch = gguf_arch.arch_for(cfg)
  vocab: Vocab = byte_vocab(cfg.vocab_size) if not tokenizer else bpe_vocab(tokenizer,
                                                                           cfg.vocab_size)
  spec = cfg.quant.spec()
  order = (gguf_container.ORDER_BASE3 if spec.ternary_packing == "base3"
           else gguf_container.ORDER_2BIT)
  rows, notes = [], [f"vocabulary: {vocab.note}"] if vocab.note else []
  tmp = output_guard.temp_file(out_path)
  writer, written = None, False
  try:
    writer = gguf.GGUFWriter(str(tmp), arch.name, use_temp_file=True)
    gguf_arch.add_hparams(writer, cfg, arch, name)
    writer.add_string(output_guard.GGUF_KEY, output_guard.WRITER)
    add_vocab(writer, vocab)
    for ent in gguf_arch.tensors(cfg, arch):
      row = _write_tensor(writer, ent, weights, spec, order, fp_dtype, all_f32, requantize_mixed)
      rows.append(row)
      if row["note"]:
        notes.append(f"{row['name']}: {row['note']}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    written = True
  finally:
    if writer is not None:
      writer.close()
    if not written:  # a refused or failed export leaves nothing behind
      output_guard.discard(tmp)
  report = {
      "format": "gguf", "writer": output_guard.WRITER, "file": out_path.name, "arch": arch.name,
      "fp_dtype": fp_dtype, "all_f32": all_f32, "requantize_mixed": requantize_mixed,
      "vocab": vocab.source,
      "tensors": rows,
      "moeqjax_bytes": sum(r["moeqjax_bytes"] for r in rows),
      "tensor_bytes": sum(r["file_bytes"] for r in rows),
      # Tensors holding a code in a type wider than that code's own exact container (mixed codes
      # in one llama.cpp tensor, ternary without TQ blocks, full-precision experts beside
      # quantized ones); empty for a student allocated with `moeqjax allocate --target gguf`.
      "widened": [r["name"] for r in rows if r["widened"]],
      "notes": notes,
  }
  output_guard.replace(tmp, out_path, KIND, overwrite)
  report["file_bytes"] = out_path.stat().st_size
  output_guard.write_text(report_path(out_path), json.dumps(report, indent=2) + "\n",
                          "gguf report", overwrite)
  return report


def _ggml_shape(shape, kind: str) -> list:
  shape = list(shape)
  if kind in ("kernel", "experts"):
    shape[-2:] = shape[-1:-3:-1]
  elif kind == "gate_vector":
    shape = [int(np.prod(shape))]
  return shape


def _write_tensor(writer, ent, weights: StudentWeights, spec, order, fp_dtype, all_f32,
                  requantize_mixed=None) -> dict:
  """Adds one tensor to the writer; returns its report row."""
  shape = weights.shape(ent.path)
  if shape is None:
    raise ConvertError(f"params have no {'/'.join(ent.path)}, which GGUF tensor {ent.name} needs")
  codes = weights.codes(ent.path) if ent.codes else None
  row = {"name": ent.name, "source": "/".join(ent.path)}
  note = ""
  if codes is None:
    row["codes"] = {"fp": int(np.prod(shape[:-2])) if ent.kind == "experts" else 1}
    row["moeqjax_bytes"] = _BF16_BYTES * int(np.prod(shape))
  else:
    row["codes"] = _codes_summary(codes)
    row["moeqjax_bytes"] = _moeqjax_bytes(shape, codes, spec)
  if codes is not None and np.all(codes != formats.FP) and not all_f32:
    data, raw, qtype, note, extra = _quantized_tensor(ent, weights.ints(ent.path), shape, codes,
                                                      spec, order, requantize_mixed)
    row.update(extra)
  else:
    if codes is not None and not all_f32:
      note = "some experts are full precision: the whole tensor is float32"
      row["widened"] = True  # its quantized experts are stored as float32
    a = _to_ggml(weights.dequantized(ent.path), ent.kind, ent.permute_heads)
    # Norms, biases and the router stay float32 as llama.cpp's own converter keeps them; a
    # dequantized weight is exact only in float32.
    keep_f32 = (all_f32 or a.ndim == 1 or ent.name.endswith("ffn_gate_inp.weight")
                or codes is not None)
    dtype = "f32" if keep_f32 else fp_dtype
    data, raw = _float_data(a, dtype)
    qtype = {"f32": "F32", "f16": "F16", "bf16": "BF16"}[dtype]
  writer.add_tensor(ent.name, data, raw_dtype=raw)
  row.setdefault("widened", False)
  row.update({"ggml_type": qtype, "shape": _ggml_shape(shape, ent.kind),
              "file_bytes": int(data.nbytes), "note": note})
  return row
