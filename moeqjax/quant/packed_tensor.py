"""Packed forms of whole weights: one matrix at one code, or stacked experts with per-expert codes."""

# A packed weight is a small dict of numpy arrays, keyed by the code's name ("ternary", "int2", ...):
#   {"int3": {"values": uint8 [n, N], "scales": [n, ng, nc], "zero_points": uint8 [n, ng, nc]}, ...}
# For stacked experts, each code present gets one buffer holding the n experts with that code (in
# expert order), plus "expert_codes" int32 [E] and "expert_slot" int32 [E] (an expert's row in its
# code's buffer). A plain matrix has one entry and no leading dim. Each expert (or matrix) is its own
# bit stream, so its byte count is exactly `memory.weight_bytes` of one [in, out] weight.
#
# For serving, `expert_bank` lays a layer's experts out as one byte stream with per-expert offsets,
# so that a decode step reads each selected expert's own bytes whatever its code (see
# moeqjax.model.packed_weights.experts).

from __future__ import annotations

import numpy as np

from moeqjax.quant import formats
from moeqjax.quant import packing
from moeqjax.quant import quantizers
from moeqjax.quant.formats import QuantSpec

SCALE_DTYPES = {2: np.float16, 4: np.float32}
EXPERT_CODES = "expert_codes"
EXPERT_SLOT = "expert_slot"


def code_key(code: int) -> str:
  """The dict key of a code's buffer: "ternary", "int2", ..."""
  return formats.code_name(code)


def code_of_key(key: str) -> int:
  """Inverse of `code_key`."""
  for code in formats.QUANT_CODES:
    if formats.code_name(code) == key:
      return code
  raise ValueError(f"{key!r} is not a packed code name; expected one of "
                   f"{[formats.code_name(c) for c in formats.QUANT_CODES]}")


def _pack_values(q_int, code: int, spec: QuantSpec) -> np.ndarray:
  if code == formats.TERNARY:
    pack = (packing.pack_ternary_2bit if spec.ternary_packing == "2bit"
            else packing.pack_ternary_base3)
    return pack(q_int)
  return packing.pack_int(q_int, code)


def unpack_values(values, code: int, spec: QuantSpec, count: int) -> np.ndarray:
  """Host-side inverse of `_pack_values`: one stream's integers [count] as `quantize_to_ints` gives them.

  int8 for symmetric specs, int16 for asymmetric ones (unsigned levels up to 255 beside ternary -1).
  """
  if code == formats.TERNARY:
    unpack = (packing.unpack_ternary_2bit if spec.ternary_packing == "2bit"
              else packing.unpack_ternary_base3)
    q = unpack(values, count)
  else:
    q = packing.unpack_int(values, code, count, signed=spec.symmetric)
  return q.astype(np.int8 if spec.symmetric else np.int16)


def _pack_same_code(w_NxIxO, code: int, spec: QuantSpec, clip) -> dict:
  """n weights [n, in, out] at one code: one packed stream each, scales and zero points."""
  q_int, scales, zero_points = quantizers.quantize_to_ints(
      w_NxIxO, np.full((w_NxIxO.shape[0],), code, np.int32), spec, clip)
  out = {
      "values": np.stack([_pack_values(q, code, spec) for q in q_int]),
      "scales": scales.astype(SCALE_DTYPES[spec.scale_bytes]),
  }
  if zero_points is not None and code != formats.TERNARY:  # ternary grids have no zero point
    out["zero_points"] = zero_points.astype(np.uint8)
  return out


def _check_quantized(codes, what: str) -> np.ndarray:
  codes = formats.validate_codes(codes)
  if np.any(codes == formats.FP):
    raise ValueError(f"{what} has code 0 (full precision), which has no packed form; give it a "
                     "quantized code (1 ternary, 2, 3, 4, 8) or keep the tensor unpacked")
  return codes


def pack_experts(w_ExIxO, codes_E, spec: QuantSpec, clip_ratio=None) -> dict:
  """Packs stacked experts, each at its own code.

  Args:
    w_ExIxO: float weights [E, in, out].
    codes_E: int codes [E], each quantized (1, 2, 3, 4, 8).
    spec: the quantization spec.
    clip_ratio: optional effective clip ratios broadcastable to `scale_shape(w.shape, spec)`,
      folded into the stored scales.

  Returns:
    {code name: {"values", "scales"[, "zero_points"]}, "expert_codes": [E], "expert_slot": [E]}.
  """
  w = np.asarray(w_ExIxO, np.float32)
  codes = _check_quantized(np.asarray(codes_E).reshape(-1), "an expert")
  if codes.shape[0] != w.shape[0]:
    raise ValueError(f"{codes.shape[0]} codes for {w.shape[0]} experts; pass one code per expert")
  clip = None
  if clip_ratio is not None:
    clip = np.broadcast_to(np.asarray(clip_ratio, np.float32),
                           np.broadcast_shapes(np.shape(clip_ratio), (w.shape[0], 1, 1)))
  out = {}
  slot = np.zeros(codes.shape, np.int32)
  for code in sorted(set(codes.tolist())):
    members = np.flatnonzero(codes == code)
    slot[members] = np.arange(members.size)
    out[code_key(code)] = _pack_same_code(w[members], code, spec,
                                          None if clip is None else clip[members])
  out[EXPERT_CODES] = codes.astype(np.int32)
  out[EXPERT_SLOT] = slot
  return out


def pack_matrix(w_IxO, code: int, spec: QuantSpec) -> dict:
  """Packs one [in, out] matrix at one quantized code: {code name: {"values", "scales", ...}}."""
  code = int(_check_quantized(code, "this matrix"))
  w = np.asarray(w_IxO, np.float32)
  buffers = _pack_same_code(w[None], code, spec, None)
  return {code_key(code): {k: v[0] for k, v in buffers.items()}}


def value_bytes(code: int, count: int, spec: QuantSpec) -> int:
  """Bytes of one packed stream of `count` values at `code` (scales and zero points excluded)."""
  if code == formats.TERNARY:
    per = (packing.TRITS_PER_BYTE_2BIT if spec.ternary_packing == "2bit"
           else packing.TRITS_PER_BYTE_BASE3)
    return -(-int(count) // per)
  return packing.packed_int_bytes(count, code)


PRESENT = "present"


def stream_order(keys, count: int, spec: QuantSpec) -> list:
  """Code names in the order their buffers lie in a bank's stream: narrowest first, then by code."""
  return sorted(keys, key=lambda k: (value_bytes(code_of_key(k), count, spec), code_of_key(k)))


def expert_bank(packed: dict, spec: QuantSpec, matrix_shape) -> dict:
  """One layer's packed experts laid out for serving: a byte stream read per expert by offset.

  Args:
    packed: a `pack_experts` result (numpy).
    spec: the quantization spec it was packed with.
    matrix_shape: one expert's [in, out].

  Returns:
    {"values": uint8 [all experts' bytes] (code buffers back to back, narrowest code first),
     "offset": int32 [E] each expert's first byte, "scales": [E, ng, nc] in expert order,
     "zero_points": uint8 [E, ng, nc] (asymmetric int codes only; 0 for ternary experts),
     "codes": int32 [E], "present": {code name: empty [n_c, 0] array} (the codes present and their
     expert counts, as static structure)}.
  """
  codes = np.asarray(packed[EXPERT_CODES])
  slot = np.asarray(packed[EXPERT_SLOT])
  count = int(matrix_shape[0]) * int(matrix_shape[1])
  # Narrowest code first, widest last: a read as wide as the widest expert, at any expert's offset,
  # then ends within the stream (the widest experts end it), so no padding is needed.
  keys = stream_order([k for k in packed if k not in (EXPERT_CODES, EXPERT_SLOT)], count, spec)
  start, chunks = {}, []
  for key in keys:
    start[key] = sum(c.size for c in chunks)
    chunks.append(np.asarray(packed[key]["values"]).reshape(-1))
  values = np.concatenate(chunks)
  offset = np.zeros(codes.shape, np.int64)
  first = packed[keys[0]]["scales"]
  scales = np.zeros((codes.size,) + first.shape[1:], first.dtype)
  has_zp = any("zero_points" in packed[k] for k in keys)
  zero_points = np.zeros(scales.shape, np.uint8) if has_zp else None
  for e, code in enumerate(codes.tolist()):
    key = code_key(code)
    offset[e] = start[key] + slot[e] * value_bytes(code, count, spec)
    scales[e] = packed[key]["scales"][slot[e]]
    if has_zp and "zero_points" in packed[key]:
      zero_points[e] = packed[key]["zero_points"][slot[e]]
  if values.size >= 2**31:
    raise ValueError(f"{values.size} bytes of experts in one layer exceed int32 offsets")
  bank = {"values": values, "offset": offset.astype(np.int32), "scales": scales,
          "codes": codes.astype(np.int32),
          # Empty arrays whose shape [n_c, 0] says how many experts have each code (static).
          PRESENT: {k: np.zeros((int(np.sum(codes == code_of_key(k))), 0), np.uint8) for k in keys}}
  if has_zp:
    bank["zero_points"] = zero_points
  return bank
