"""Bit codes, their storage cost, and the QuantSpec that fixes how a weight is quantized."""

from __future__ import annotations

import dataclasses

import numpy as np

# A bit code says how one expert (or one tensor) is stored. It is data: an int array traced through jit.
FP = 0  # full precision, kept in bf16; the quantizer passes the weight through unchanged
TERNARY = 1  # {-1, 0, +1} * scale; a code of its own, not "1 bit"
VALID_CODES = (0, 1, 2, 3, 4, 8)
QUANT_CODES = (1, 2, 3, 4, 8)
INT_CODES = (2, 3, 4, 8)

GRANULARITIES = ("tensor", "channel", "group")
TERNARY_METHODS = ("absmean", "twn")
TERNARY_PACKINGS = ("2bit", "base3")
SCALE_BYTES = (2, 4)  # fp16 or fp32 scales
SCALE_INITS = ("absmax", "mse")  # the scale of a group: its statistic, or the MSE-optimal grid search

_CHOICES_TEXT = "0 (full precision), 1 (ternary), 2, 3, 4, 8"
_FP_STORAGE_BITS = 16.0  # full-precision weights are stored as bf16


def validate_codes(codes) -> np.ndarray:
  """Checks on the host that every bit code is supported.

  Args:
    codes: an int or an integer array-like of any shape (e.g. [E] or [L, E]).

  Returns:
    The codes as an int32 numpy array of the same shape.

  Raises:
    ValueError: if a code is not in VALID_CODES or the codes are not integers.
  """
  arr = np.asarray(codes)
  if arr.dtype.kind not in "iu":
    if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
      arr = arr.astype(np.int64)
    else:
      raise ValueError(
          f"bit codes must be integers, got dtype {arr.dtype}; pass e.g. np.array([4, 1], np.int32)")
  bad = ~np.isin(arr, VALID_CODES)
  if np.any(bad):
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"unsupported bit code {int(arr[index])} at index {index}; choose from {_CHOICES_TEXT}")
  return arr.astype(np.int32)


def code_name(code: int) -> str:
  """Human-readable name of a bit code: "fp", "ternary", "int2", ..., "int8"."""
  code = int(validate_codes(code))
  if code == FP:
    return "fp"
  if code == TERNARY:
    return "ternary"
  return f"int{code}"


def storage_bits(code: int, ternary_packing: str) -> float:
  """Bits per stored weight for a code, excluding scales and zero points.

  Args:
    code: one bit code from VALID_CODES.
    ternary_packing: "2bit" (4 trits per byte, 2.0 bits) or "base3" (5 trits per byte, 1.6 bits).

  Returns:
    16.0 for full precision (bf16), 2.0 or 1.6 for ternary, N for intN.
  """
  _check_choice("ternary_packing", ternary_packing, TERNARY_PACKINGS)
  code = int(validate_codes(code))
  if code == FP:
    return _FP_STORAGE_BITS
  if code == TERNARY:
    return 2.0 if ternary_packing == "2bit" else 8.0 / 5.0
  return float(code)


def _check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"{name}={value!r} is unsupported; choose from {choices}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How weights are quantized; static (hashable) so it can be closed over or passed as a jit static arg.

  Attributes:
    granularity: "tensor" (one scale per leading index), "channel" (one per output channel) or
      "group" (one per block of `group_size` consecutive input weights of an output channel).
    group_size: input weights per scale when granularity == "group" (e.g. 32, 64, 128).
    symmetric: True for a symmetric intN grid; False adds a zero point per group (intN only,
      ternary is always symmetric).
    ternary_method: "absmean" (BitNet b1.58) or "twn" (ternary weight networks threshold).
    learn_clip: whether the model should train a clipping ratio in [0.05, 1] per group (intN only).
    scale_init: "absmax" (intN absmax or min/max, ternary per `ternary_method`) or "mse" (a grid
      search per group for the scale ratio that minimises the reconstruction error; ternary then
      uses round-to-nearest levels at the searched scale, see moeqjax.quant.scale_search).
    learn_scale: whether the model should train an LSQ scale ratio per group, for ternary and intN
      (exclusive with learn_clip; the ratio lives in the same `*_clip` params).
    ternary_packing: storage of ternary weights, "2bit" or "base3".
    scale_bytes: bytes per stored scale: 2 (fp16) or 4 (fp32).
    stored_ratio: whether the model carries a fixed (untrained) intN scale ratio per group in the
      same `*_clip` params: GPTQ's chosen scales (exclusive with learn_clip and learn_scale).
  """

  granularity: str = "channel"
  group_size: int = 32
  symmetric: bool = True
  ternary_method: str = "absmean"
  learn_clip: bool = False
  ternary_packing: str = "2bit"
  scale_bytes: int = 2
  scale_init: str = "absmax"
  learn_scale: bool = False
  stored_ratio: bool = False

  def __post_init__(self):
    _check_choice("granularity", self.granularity, GRANULARITIES)
    _check_choice("ternary_method", self.ternary_method, TERNARY_METHODS)
    _check_choice("ternary_packing", self.ternary_packing, TERNARY_PACKINGS)
    _check_choice("scale_bytes", self.scale_bytes, SCALE_BYTES)
    _check_choice("scale_init", self.scale_init, SCALE_INITS)
    if isinstance(self.group_size, bool) or not isinstance(self.group_size, (int, np.integer)):
      raise ValueError(f"group_size={self.group_size!r} must be a positive int such as 32, 64 or 128")
    if self.group_size <= 0:
      raise ValueError(f"group_size={self.group_size} must be positive, e.g. 32, 64 or 128")
    if not isinstance(self.symmetric, (bool, np.bool_)):
      raise ValueError(f"symmetric={self.symmetric!r} must be True or False")
    for name in ("learn_clip", "learn_scale", "stored_ratio"):
      if not isinstance(getattr(self, name), (bool, np.bool_)):
        raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
    if self.learn_clip and self.learn_scale:
      raise ValueError("learn_clip=True and learn_scale=True: choose one (learn_scale also learns"
                       " the intN clipping, and ternary scales too)")
    if self.stored_ratio and self.learns_ratio:
      raise ValueError("stored_ratio=True keeps GPTQ's scale ratios fixed and cannot be combined with"
                       " learn_clip or learn_scale; drop one")

  @property
  def learns_ratio(self) -> bool:
    """Whether the model trains a scale ratio per group (`*_clip` params)."""
    return bool(self.learn_clip or self.learn_scale)

  @property
  def has_ratio(self) -> bool:
    """Whether the model carries a scale ratio per group (`*_clip` params), learned or stored."""
    return bool(self.learns_ratio or self.stored_ratio)
