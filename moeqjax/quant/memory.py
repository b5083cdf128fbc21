"""True stored bytes of quantized weights: packed values plus scales and zero points."""

# Accounting rules (the same in the formula and in the real packed buffers):
#   - FP (code 0): 2 bytes per weight (bf16), no scales.
#   - ternary: ceil(n / 4) bytes ("2bit") or ceil(n / 5) bytes ("base3"), plus one scale per group;
#     never a zero point, even for asymmetric specs (the ternary grid is symmetric).
#   - intN: ceil(n * N / 8) bytes, plus one scale per group, plus one uint8 zero point per group for
#     asymmetric specs (the zero point lies in [0, 2^N - 1] because the range always includes 0).
#   - scales take spec.scale_bytes each (2 = fp16, 4 = fp32).
# One tensor is packed as a single bit stream, so the ceil applies once per tensor.

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from moeqjax.quant import formats
from moeqjax.quant import granularity as gran
from moeqjax.quant import packing
from moeqjax.quant import quantizers
from moeqjax.quant.formats import QuantSpec

_FP_BYTES = 2  # bf16
_ZERO_POINT_BYTES = 1  # uint8
_SCALE_DTYPES = {2: np.float16, 4: np.float32}


def _single_code(code) -> int:
  arr = formats.validate_codes(code)
  if arr.ndim != 0:
    raise ValueError(f"expected one bit code for one tensor, got codes of shape {arr.shape}")
  return int(arr)


def weight_bytes(shape, code: int, spec: QuantSpec) -> int:
  """Stored bytes of ONE weight tensor at one bit code, from the formula.

  Args:
    shape: the tensor's shape [in, out] (leading dims, if any, belong to the same tensor: its values
      are packed as one stream and each leading index has its own groups).
    code: one bit code from VALID_CODES.
    spec: the quantization spec (granularity, packing, scale bytes, symmetry).

  Returns:
    Packed weight bytes + scale bytes + zero point bytes, as in the module's accounting rules.
  """
  code = _single_code(code)
  n = math.prod(gran.grouped_shape(shape, spec))  # also checks the shape against the granularity
  if code == formats.FP:
    return _FP_BYTES * n
  if code == formats.TERNARY:
    per_byte = (packing.TRITS_PER_BYTE_2BIT if spec.ternary_packing == "2bit"
                else packing.TRITS_PER_BYTE_BASE3)
    values = -(-n // per_byte)
  else:
    values = packing.packed_int_bytes(n, code)
  groups = gran.num_groups(shape, spec)
  zero_points = groups * _ZERO_POINT_BYTES if (code != formats.TERNARY and not spec.symmetric) else 0
  return values + groups * spec.scale_bytes + zero_points


def packed_weight_bytes(w, code: int, spec: QuantSpec) -> int:
  """Stored bytes of a weight measured on real buffers: quantize, pack, and count nbytes.

  Args:
    w: one weight tensor [in, out] (numpy or jax).
    code: one bit code from VALID_CODES.
    spec: the quantization spec.

  Returns:
    nbytes of the packed values + scales in the scale dtype + uint8 zero points (asymmetric intN).
  """
  code = _single_code(code)
  w = np.asarray(w, np.float32)
  if code == formats.FP:
    return int(np.asarray(w, jnp.bfloat16).nbytes)
  q_int, scales, zero_points = quantizers.quantize_to_ints(w, np.int32(code), spec)
  if code == formats.TERNARY:
    pack = (packing.pack_ternary_2bit if spec.ternary_packing == "2bit"
            else packing.pack_ternary_base3)
    values = pack(q_int)
    zero_points = None  # ternary groups carry zero point 0; nothing is stored for them
  else:
    values = packing.pack_int(q_int, code)
  total = values.nbytes + scales.astype(_SCALE_DTYPES[spec.scale_bytes]).nbytes
  if zero_points is not None:
    total += zero_points.astype(np.uint8).nbytes
  return int(total)


def expert_bytes(expert_shapes: dict, codes_LxE, spec: QuantSpec) -> dict:
  """Memory of all routed experts under a per-layer, per-expert bit allocation.

  Args:
    expert_shapes: weight name (e.g. "w_in", "w_gate", "w_out") -> ONE expert's [in, out] shape.
    codes_LxE: int codes [num_layers, num_experts] for every tensor of an expert, or a dict
      {weight name: [num_layers, num_experts]} with one entry per name of `expert_shapes` (codes
      per projection).
    spec: the quantization spec.

  Returns:
    A dict with
      "total_bytes": int, all expert weights incl. scales and zero points;
      "num_weights": int, number of expert weights;
      "bits_per_weight": float, 8 * total_bytes / num_weights (scales and zero points included);
      "avg_code_bits": float, the weight-count-weighted mean of `storage_bits(code)` (packing included,
        scales excluded; FP counts as 16);
      "bytes_per_layer": list[int] of length num_layers.
  """
  if not expert_shapes:
    raise ValueError("expert_shapes is empty; pass e.g. {'w_in': (D, F), 'w_out': (F, D)}")
  if isinstance(codes_LxE, dict):
    if sorted(codes_LxE) != sorted(expert_shapes):
      raise ValueError(f"codes per weight name {sorted(codes_LxE)} must name exactly the expert "
                       f"tensors {sorted(expert_shapes)}")
    per_name = {n: formats.validate_codes(codes_LxE[n]) for n in expert_shapes}
  else:
    codes = formats.validate_codes(codes_LxE)
    per_name = {n: codes for n in expert_shapes}
  shapes = {c.shape for c in per_name.values()}
  if len(shapes) != 1 or len(next(iter(shapes))) != 2:
    raise ValueError(f"codes_LxE must be [num_layers, num_experts], got shape(s) {sorted(shapes)}")
  if next(iter(per_name.values())).size == 0:
    raise ValueError("codes_LxE is empty; pass at least one layer and one expert")
  weights_per_expert = sum(math.prod(s) for s in expert_shapes.values())

  def bits_of(codes):
    return np.vectorize(lambda c: formats.storage_bits(c, spec.ternary_packing),
                        otypes=[np.float64])(codes)

  if isinstance(codes_LxE, dict):
    bytes_LxE, code_bits = 0, 0.0
    for name, shape in expert_shapes.items():
      codes = per_name[name]
      per_code = {c: weight_bytes(shape, c, spec) for c in np.unique(codes).tolist()}
      bytes_LxE = bytes_LxE + np.vectorize(per_code.__getitem__, otypes=[np.int64])(codes)
      code_bits = code_bits + bits_of(codes) * math.prod(shape)
    bits_LxE = code_bits / weights_per_expert  # weighted by the tensors' sizes
  else:
    per_expert = {c: sum(weight_bytes(s, c, spec) for s in expert_shapes.values())
                  for c in np.unique(codes).tolist()}
    bytes_LxE = np.vectorize(per_expert.__getitem__, otypes=[np.int64])(codes)
    bits_LxE = bits_of(codes)
  total = int(bytes_LxE.sum())
  num_weights = weights_per_expert * bytes_LxE.size
  return {
      "total_bytes": total,
      "num_weights": int(num_weights),
      "bits_per_weight": 8.0 * total / num_weights,
      "avg_code_bits": float(bits_LxE.mean()),
      "bytes_per_layer": [int(b) for b in bytes_LxE.sum(axis=1)],
  }
