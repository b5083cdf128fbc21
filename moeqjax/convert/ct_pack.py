"""compressed-tensors `pack-quantized` bit layout: signed integer levels densely packed into int32 words."""

# The layout (compressed-tensors 0.20, pack_to_int32): along the packed axis, element i of a row
# sits at bit i * bits of the row's little-endian int32 stream, stored as level + 2^(bits - 1)
# (unsigned). Rows are padded to whole words. Weights pack along their last axis (`in`); zero
# points pack along their first axis (`out`). Only 4 and 8 bits are used here: those are the
# widths vLLM's MoE kernels accept, and they divide 32, so no element straddles two words.

from __future__ import annotations

import numpy as np

BITS = (4, 8)


def level_range(bits: int) -> tuple[int, int]:
  """Inclusive signed range a `bits`-wide container stores."""
  return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def pack_rows(levels, bits: int) -> np.ndarray:
  """Packs signed levels along the last axis into int32 words.

  Args:
    levels: integers [..., cols] in `level_range(bits)`.
    bits: 4 or 8.

  Returns:
    int32 [..., ceil(cols * bits / 32)].
  """
  if bits not in BITS:
    raise ValueError(f"bits={bits}; this packer writes {BITS}")
  levels = np.asarray(levels)
  lo, hi = level_range(bits)
  if levels.size and (levels.min() < lo or levels.max() > hi):
    raise ValueError(f"{bits}-bit levels lie in [{lo}, {hi}]; got [{levels.min()}, {levels.max()}]")
  per_word = 32 // bits
  *lead, cols = levels.shape
  words = -(-cols // per_word)
  u = np.zeros((*lead, words * per_word), np.uint32)
  u[..., :cols] = (levels.astype(np.int64) + (1 << (bits - 1))).astype(np.uint32)
  u = u.reshape(*lead, words, per_word)
  shifts = (np.arange(per_word, dtype=np.uint32) * bits)
  packed = np.bitwise_or.reduce(u << shifts, axis=-1)
  return packed.view(np.int32)


def pack_columns(levels, bits: int) -> np.ndarray:
  """Packs signed levels along the first axis (zero points [out, groups] -> [words, groups])."""
  return np.ascontiguousarray(pack_rows(np.asarray(levels).T, bits).T)


def unpack_rows(packed, bits: int, cols: int) -> np.ndarray:
  """Inverse of `pack_rows` (for tests and readback): int32 [..., words] -> int32 [..., cols]."""
  per_word = 32 // bits
  u = np.asarray(packed).view(np.uint32)[..., None] >> (np.arange(per_word, dtype=np.uint32) * bits)
  u = (u & np.uint32((1 << bits) - 1)).reshape(*u.shape[:-2], -1)[..., :cols]
  return u.astype(np.int32) - (1 << (bits - 1))
