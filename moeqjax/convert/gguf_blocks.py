"""ggml block encoders (TQ1_0, TQ2_0, Q4_0, Q4_1, Q8_0) from given integer levels and fp16 block scales."""

# Nothing here rounds a weight: every encoder takes the integer levels and the per-block fp16
# parameters as they are and only lays out bits, so a block dequantizes to exactly d * level
# (+ m for Q4_1). Rows are the last axis (ggml's contiguous dim); leading dims are kept.
#
# Layouts (ggml-common.h), per block of `block` weights:
#   TQ2_0 (256): qs[64] then d. Weight c*128 + k*32 + j sits in byte c*32 + j at bits 2k, as level+1.
#   TQ1_0 (256): qs[48], qh[4], then d. Bytes hold 5 (qh: 4) trits t0..t4 of level+1 as
#     ceil(256 * sum_i t_i * 3^(4-i) / 243); weight i*32 + j of the first 160 sits in byte j,
#     160 + i*16 + j in byte 32 + j, 240 + i*4 + j in qh byte j.
#   Q4_0 (32): d then 16 bytes; weight j in the low nibble of byte j, weight 16 + j in the high
#     nibble, as level + 8.
#   Q4_1 (32): d, m then 16 bytes like Q4_0 holding the unsigned level n (value d * n + m).
#   Q8_0 (32): d then 32 int8 levels.

from __future__ import annotations

import numpy as np

QK = 32  # block of Q4_0, Q4_1, Q8_0
QK_K = 256  # block of TQ1_0, TQ2_0

# name -> (weights per block, bytes per block); the same figures as gguf.GGML_QUANT_SIZES.
BLOCKS = {"TQ1_0": (QK_K, 54), "TQ2_0": (QK_K, 66), "Q4_0": (QK, 18), "Q4_1": (QK, 20),
          "Q8_0": (QK, 34)}
# Inclusive range of the level each type stores (Q4_1 stores an unsigned level n).
LEVEL_RANGE = {"TQ1_0": (-1, 1), "TQ2_0": (-1, 1), "Q4_0": (-8, 7), "Q4_1": (0, 15),
               "Q8_0": (-128, 127)}


def _fp16_bytes(x_f32):
  """[..., nb] float values (already fp16-exact) -> [..., nb, 2] little-endian fp16 bytes."""
  h = np.asarray(x_f32, np.float32).astype("<f2")
  return h.view(np.uint8).reshape(h.shape + (2,))


def _blocks(levels, block):
  """[..., cols] -> [..., nb, block] (cols must be a multiple of block)."""
  *lead, cols = levels.shape
  if cols % block:
    raise ValueError(f"row length {cols} is not a multiple of the block size {block}")
  return levels.reshape(*lead, cols // block, block)


def _check_levels(levels, qtype):
  lo, hi = LEVEL_RANGE[qtype]
  if levels.size and (levels.min() < lo or levels.max() > hi):
    raise ValueError(f"{qtype} stores levels in [{lo}, {hi}]; got [{levels.min()}, {levels.max()}]")


def encode(qtype: str, levels, d, m=None) -> np.ndarray:
  """Encodes integer levels with fp16 block scales into ggml blocks of `qtype`.

  Args:
    qtype: one of BLOCKS.
    levels: integers [..., cols], in LEVEL_RANGE[qtype]; cols a multiple of the block size.
    d: float32 [..., cols // block], fp16-exact block scales.
    m: float32 [..., cols // block], fp16-exact block minimums (Q4_1 only).

  Returns:
    uint8 [..., (cols // block) * bytes_per_block]: the tensor's data as ggml stores it.
  """
  levels = np.asarray(levels)
  _check_levels(levels, qtype)
  block, _ = BLOCKS[qtype]
  b = _blocks(levels.astype(np.int16), block)
  d16 = _fp16_bytes(d)
  if qtype == "Q8_0":
    body = b.astype(np.int8).view(np.uint8)
    out = np.concatenate([d16, body], axis=-1)
  elif qtype in ("Q4_0", "Q4_1"):
    u = (b + (8 if qtype == "Q4_0" else 0)).astype(np.uint8)
    body = u[..., :16] | (u[..., 16:] << np.uint8(4))
    parts = [d16, body] if qtype == "Q4_0" else [d16, _fp16_bytes(m), body]
    out = np.concatenate(parts, axis=-1)
  elif qtype == "TQ2_0":
    u = (b + 1).astype(np.uint8).reshape(b.shape[:-1] + (2, 4, 32))
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    body = np.bitwise_or.reduce(u << shifts, axis=-2).reshape(b.shape[:-1] + (64,))
    out = np.concatenate([body, d16], axis=-1)
  elif qtype == "TQ1_0":
    out = np.concatenate([_tq1_body(b + 1), d16], axis=-1)
  else:
    raise ValueError(f"unknown block type {qtype!r}; choose from {sorted(BLOCKS)}")
  return out.reshape(*out.shape[:-2], -1)


def _pack_trits(t, n):
  """t: [..., n, width] trits in {0, 1, 2} -> [..., width] bytes holding n trits each."""
  powers = (3 ** np.arange(4, 4 - n, -1)).astype(np.uint16).reshape(n, 1)
  v = np.sum(t.astype(np.uint16) * powers, axis=-2)
  # A byte b decodes trit i as ((b * 3^i) mod 256 * 3) >> 8; the ceiling makes that exact.
  return ((v * 256 + 242) // 243).astype(np.uint8)


def _tq1_body(t):
  """t: [..., nb, 256] trits -> [..., nb, 52] (qs[48] then qh[4])."""
  lead = t.shape[:-1]
  qs0 = _pack_trits(t[..., :160].reshape(lead + (5, 32)), 5)
  qs1 = _pack_trits(t[..., 160:240].reshape(lead + (5, 16)), 5)
  qh = _pack_trits(t[..., 240:].reshape(lead + (4, 4)), 4)
  return np.concatenate([qs0, qs1, qh], axis=-1)
