"""compressed-tensors `pack-quantized` bit layout: signed integer levels densely packed into int32 words."""

# The layout (compressed-tensors 0.20, pack_to_int32): along the packed axis, element i of a row
# sits at bit i * bits of the row's little-endian int32 stream, stored as level + 2^(bits - 1)
# (unsigned). Rows are padded to whole words. Weights pack along their last axis (`in`); zero
# points pack along their first axis (`out`). Any width 1..8 packs (a 3-bit element may straddle
# two words, as compressed-tensors >= 0.18 lays it out); the decoder-only export uses 4 and 8
# only, the widths vLLM's MoE kernels accept, and the Switch export each code's own width.

from __future__ import annotations

import numpy as np

BITS = tuple(range(1, 9))


def level_range(bits: int) -> tuple[int, int]:
  """Inclusive signed range a `bits`-wide container stores."""
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_rows(levels, bits: int) -> np.ndarray:
  """Packs signed levels along the last axis into int32 words.

  Args:
    levels: integers [..., cols] in `level_range(bits)`.
    bits: 1 to 8.

  Returns:
    int32 [..., ceil(cols * bits / 32)].
  """
  if bits not in BITS:
    raise ValueError(f"bits={bits}; this packer writes {BITS}")
  levels = np.asarray(levels)
  lo, hi = level_range(bits)
  if levels.size and (levels.min() < lo or levels.max() > hi):
    raise ValueError(f"{bits}-bit levels lie in [{lo}, {hi}]; got [{levels.min()}, {levels.max()}]")
  *lead, cols = levels.shape
  words = -(-cols * bits // 32)
  u = (levels.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
  # The row's bit stream, element i at bits [i * bits, (i + 1) * bits), least significant first.
  stream = np.zeros((*lead, words * 32), np.uint32)
  stream[..., :cols * bits] = ((u[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).reshape(
      *lead, cols * bits)
  stream = stream.reshape(*lead, words, 32) << np.arange(32, dtype=np.uint32)
  return np.bitwise_or.reduce(stream, axis=-1).astype(np.uint32).view(np.int32)


def pack_columns(levels, bits: int) -> np.ndarray:
  """Packs signed levels along the first axis (zero points [out, groups] -> [words, groups])."""
  return np.ascontiguousarray(pack_rows(np.asarray(levels).T, bits).T)


def unpack_rows(packed, bits: int, cols: int) -> np.ndarray:
  """Inverse of `pack_rows` (for tests and readback): int32 [..., words] -> int32 [..., cols]."""
  words = np.asarray(packed).view(np.uint32)
  stream = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
  stream = stream.reshape(*words.shape[:-1], -1)[..., :cols * bits]
  stream = stream.reshape(*words.shape[:-1], cols, bits) << np.arange(bits, dtype=np.uint32)
  return np.bitwise_or.reduce(stream, axis=-1).astype(np.int32) - (1 << (bits - 1))
