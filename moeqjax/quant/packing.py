"""Bit packing of low-bit integers and ternary weights into uint8 buffers (numpy, host side)."""

# Layout: values are flattened in C order and written as one little-endian bit stream: value i occupies
# bits [i * bits, (i + 1) * bits) of the stream, least significant bit first, and stream bit j is bit
# (j % 8) of byte j // 8. A 3-bit value may therefore straddle two bytes. Signed values are stored in
# two's complement (their low `bits` bits) and sign-extended on unpacking. Trailing pad bits are zero.

from __future__ import annotations

import numpy as np

INT_BITS = (2, 3, 4, 8)
TRITS_PER_BYTE_2BIT = 4
TRITS_PER_BYTE_BASE3 = 5  # 3^5 = 243 <= 256
_POW3 = 3 ** np.arange(TRITS_PER_BYTE_BASE3, dtype=np.int32)


def _check_bits(bits: int) -> int:
  if bits not in INT_BITS:
    raise ValueError(f"bits={bits!r} is unsupported for packing; choose from {INT_BITS}")
  return int(bits)


def _check_count(count: int, capacity: int, what: str) -> int:
  count = int(count)
  if count < 0 or count > capacity:
    raise ValueError(
        f"count={count} does not fit the packed buffer, which holds at most {capacity} {what};"
        " pass the element count recorded at packing time")
  return count


def packed_int_bytes(count: int, bits: int) -> int:
  """Bytes used by `pack_int` for `count` values of `bits` bits: ceil(count * bits / 8)."""
  return -(-int(count) * _check_bits(bits) // 8)


def pack_int(q, bits: int) -> np.ndarray:
  """Packs integers of `bits` bits into a little-endian bit stream.

  Args:
    q: integer array of any shape (flattened in C order); values must fit `bits` bits, either signed
      [-2^(bits-1), 2^(bits-1) - 1] (stored in two's complement) or unsigned [0, 2^bits - 1].
    bits: 2, 3, 4 or 8.

  Returns:
    uint8 array [ceil(q.size * bits / 8)].
  """
  bits = _check_bits(bits)
  q = np.asarray(q).reshape(-1)
  if q.size and q.dtype.kind not in "iu":
    raise ValueError(f"pack_int expects integers, got dtype {q.dtype}; round and cast first")
  q = q.astype(np.int64)
  if q.size and (q.min() < -(1 << (bits - 1)) or q.max() > (1 << bits) - 1):
    raise ValueError(
        f"values in [{q.min()}, {q.max()}] do not fit {bits} bits; signed values must lie in"
        f" [{-(1 << (bits - 1))}, {(1 << (bits - 1)) - 1}] and unsigned ones in [0, {(1 << bits) - 1}]")
  low = q & ((1 << bits) - 1)  # two's complement low bits for negative values
  stream = ((low[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
  return np.packbits(stream, bitorder="little")


def unpack_int(packed, bits: int, count: int, signed: bool) -> np.ndarray:
  """Inverse of `pack_int`.

  Args:
    packed: uint8 array from `pack_int`.
    bits: the bits per value used when packing.
    count: number of values to read.
    signed: True to sign-extend from two's complement.

  Returns:
    [count] values: int8 when signed, uint8 when unsigned (8-bit unsigned values reach 255).
  """
  bits = _check_bits(bits)
  packed = np.asarray(packed, np.uint8).reshape(-1)
  count = _check_count(count, packed.size * 8 // bits, f"{bits}-bit values")
  stream = np.unpackbits(packed, bitorder="little")[: count * bits].reshape(count, bits)
  values = (stream.astype(np.int32) << np.arange(bits)).sum(axis=1)
  if signed:
    values = np.where(values >= (1 << (bits - 1)), values - (1 << bits), values)
    return values.astype(np.int8)
  return values.astype(np.uint8)


def _check_trits(t) -> np.ndarray:
  t = np.asarray(t).reshape(-1)
  if t.size and not np.all((t == -1) | (t == 0) | (t == 1)):
    bad = t[(t != -1) & (t != 0) & (t != 1)][0]
    raise ValueError(f"ternary values must be -1, 0 or 1, found {bad}; quantize with code 1 first")
  return t.astype(np.int64)


def pack_ternary_2bit(t) -> np.ndarray:
  """Packs ternary values 4 per byte as 2-bit fields holding t + 1 (0, 1, 2), little-endian.

  Args:
    t: array of -1/0/1 of any shape (flattened in C order).

  Returns:
    uint8 array [ceil(t.size / 4)].
  """
  return pack_int(_check_trits(t) + 1, 2)


def unpack_ternary_2bit(packed, count: int) -> np.ndarray:
  """Inverse of `pack_ternary_2bit`: int8 [count] in {-1, 0, 1}."""
  return (unpack_int(packed, 2, count, signed=False).astype(np.int8) - 1).astype(np.int8)


def pack_ternary_base3(t) -> np.ndarray:
  """Packs ternary values 5 per byte in base 3: byte = sum_i (t_i + 1) * 3^i (at most 242).

  Args:
    t: array of -1/0/1 of any shape (flattened in C order).

  Returns:
    uint8 array [ceil(t.size / 5)]; the last byte is padded with digit 0.
  """
  digits = _check_trits(t) + 1
  pad = -digits.size % TRITS_PER_BYTE_BASE3
  digits = np.concatenate([digits, np.zeros(pad, np.int64)]).reshape(-1, TRITS_PER_BYTE_BASE3)
  return (digits @ _POW3).astype(np.uint8)


def unpack_ternary_base3(packed, count: int) -> np.ndarray:
  """Inverse of `pack_ternary_base3`: int8 [count] in {-1, 0, 1}."""
  packed = np.asarray(packed, np.uint8).reshape(-1)
  count = _check_count(count, packed.size * TRITS_PER_BYTE_BASE3, "trits")
  if packed.size and packed.max() >= 3 ** TRITS_PER_BYTE_BASE3:
    raise ValueError(
        f"byte value {packed.max()} is not a base-3 ternary byte (max 242); was it packed with"
        " pack_ternary_base3?")
  digits = (packed.astype(np.int32)[:, None] // _POW3) % 3
  return (digits.reshape(-1)[:count] - 1).astype(np.int8)
