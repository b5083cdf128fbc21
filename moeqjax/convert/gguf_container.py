"""Choice of the narrowest ggml block type that holds a tensor's integer levels and scales exactly."""

from __future__ import annotations

import dataclasses

import numpy as np

from moeqjax.convert import gguf_blocks

# Block types by bytes per weight, narrowest first (TQ1_0 1.69, TQ2_0 2.06, Q4_0 4.5, Q4_1 5.0,
# Q8_0 8.5). K-quants are absent on purpose: they re-quantize their sub-scales, so they are not exact.
ORDER_2BIT = ("TQ2_0", "TQ1_0", "Q4_0", "Q4_1", "Q8_0")  # ternary_packing "2bit": TQ2_0 first
ORDER_BASE3 = ("TQ1_0", "TQ2_0", "Q4_0", "Q4_1", "Q8_0")  # ternary_packing "base3": TQ1_0 first


@dataclasses.dataclass(frozen=True)
class Encoded:
  """A tensor laid out in one ggml block type.

  qtype: the ggml type name, e.g. "Q4_0".
  data: uint8 [..., rows, bytes_per_row] as the file stores it.
  skipped: {narrower type: why it was not exact}, in the order tried.
  """

  qtype: str
  data: np.ndarray
  skipped: dict


def _fp16_exact(x):
  return bool(np.all(np.isfinite(x)) and np.all(x.astype(np.float16).astype(np.float32) == x))


def _q4_1_offset(lb):
  """Per block, an offset o with 0 <= level + o <= 15, or None when some block spans > 16 levels.

  Any such o is exact when m = -o * d is exact in fp16: d * (level + o) and m are then exact, and
  float32 adds them without rounding. Of the valid offsets, the one with the most trailing zero
  bits is taken (0 or a power of two keeps m exact for every fp16 d).
  """
  lo, hi = -lb.min(axis=-1), 15 - lb.max(axis=-1)
  if np.any(lo > hi):
    return None
  offset = np.full(lo.shape, -1, np.int32)
  for p in (16, 8, 4, 2, 1):
    c = -(-lo // p) * p  # the smallest multiple of p that is >= lo
    offset = np.where((offset < 0) & (c <= hi), c, offset)
  return offset


def _try(qtype: str, levels, scale):
  """(data, None) when `qtype` holds levels * scale exactly, else (None, reason)."""
  block, _ = gguf_blocks.BLOCKS[qtype]
  cols = levels.shape[-1]
  if cols % block:
    return None, f"row length {cols} is not a multiple of its block of {block}"
  lb = levels.reshape(levels.shape[:-1] + (cols // block, block))
  sb = scale.reshape(lb.shape)
  d = sb[..., 0]
  if not np.all(sb == d[..., None]):
    return None, f"the scale changes inside a block of {block} weights (group_size < {block})"
  if not _fp16_exact(d):
    return None, "a scale is not exact in float16 (train with quant.scale_bytes=2)"
  if qtype == "Q4_1":
    offset = _q4_1_offset(lb)
    if offset is None:
      return None, "a block spans more than 16 levels"
    m = (-offset * d).astype(np.float32)
    if not _fp16_exact(m):
      return None, "a block minimum (-offset * scale) is not exact in float16"
    n = lb + offset[..., None]
    return gguf_blocks.encode(qtype, n.reshape(levels.shape), d, m), None
  lo, hi = gguf_blocks.LEVEL_RANGE[qtype]
  if lb.size and (lb.min() < lo or lb.max() > hi):
    return None, f"levels [{lb.min()}, {lb.max()}] exceed its range [{lo}, {hi}]"
  return gguf_blocks.encode(qtype, levels, d), None


def encode_as(qtype: str, levels, scale):
  """(data, None) when `qtype` holds levels * scale exactly, else (None, the reason)."""
  return _try(qtype, np.asarray(levels, np.int32), np.asarray(scale, np.float32))


def encode_exact(levels, scale, order=ORDER_2BIT, start: str | None = None):
  """The first block type of `order` (from `start` on) that holds levels * scale exactly.

  Args:
    levels: signed integer levels [..., rows, cols] (our q - zero_point), ggml orientation.
    scale: float32 [..., rows, cols], each weight's scale (constant over a quantization group).
    order: candidate types, narrowest first.
    start: skip the types before this one (e.g. "Q4_0" for codes that are not ternary).

  Returns:
    (encoded, skipped): the `Encoded` tensor, or None when no type is exact; and
    {type: why it is not exact} for the types tried before it.
  """
  levels = np.asarray(levels, np.int32)
  scale = np.asarray(scale, np.float32)
  cands = order[order.index(start):] if start else order
  skipped = {}
  for qtype in cands:
    data, why = _try(qtype, levels, scale)
    if data is not None:
      return Encoded(qtype, data, skipped), skipped
    skipped[qtype] = why
  return None, skipped
