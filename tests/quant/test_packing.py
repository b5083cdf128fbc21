"""Bit packing: exact round trips (property tests), byte counts and the documented byte layout."""

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from moeqjax.quant import pack_int
from moeqjax.quant import pack_ternary_2bit
from moeqjax.quant import pack_ternary_base3
from moeqjax.quant import packed_int_bytes
from moeqjax.quant import unpack_int
from moeqjax.quant import unpack_ternary_2bit
from moeqjax.quant import unpack_ternary_base3

_SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def _int_arrays(draw):
  bits = draw(st.sampled_from((2, 3, 4, 8)))
  signed = draw(st.booleans())
  lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
  n = draw(st.integers(0, 67))  # covers lengths that are not a multiple of any per-byte count
  q = draw(hnp.arrays(np.int64, n, elements=st.integers(lo, hi)))
  return q, bits, signed


_TRITS = hnp.arrays(np.int8, st.integers(0, 53), elements=st.sampled_from((-1, 0, 1)))


@_SETTINGS
@given(_int_arrays())
def test_pack_int_round_trips_exactly(case):
  q, bits, signed = case
  packed = pack_int(q, bits)
  assert packed.dtype == np.uint8
  assert packed.size == -(-q.size * bits // 8) == packed_int_bytes(q.size, bits)
  out = unpack_int(packed, bits, q.size, signed)
  assert out.dtype == (np.int8 if signed else np.uint8)
  np.testing.assert_array_equal(out.astype(np.int64), q)


@_SETTINGS
@given(_TRITS)
def test_ternary_2bit_round_trips_exactly(t):
  packed = pack_ternary_2bit(t)
  assert packed.dtype == np.uint8 and packed.size == -(-t.size // 4)
  np.testing.assert_array_equal(unpack_ternary_2bit(packed, t.size), t)


@_SETTINGS
@given(_TRITS)
def test_ternary_base3_round_trips_exactly(t):
  packed = pack_ternary_base3(t)
  assert packed.dtype == np.uint8 and packed.size == -(-t.size // 5)
  assert packed.size == 0 or packed.max() <= 242
  np.testing.assert_array_equal(unpack_ternary_base3(packed, t.size), t)


def test_multidimensional_input_is_flattened_in_c_order():
  q = np.arange(-4, 4, dtype=np.int8).reshape(2, 4)
  np.testing.assert_array_equal(unpack_int(pack_int(q, 3), 3, 8, signed=True), q.reshape(-1))


def test_byte_layout_is_little_endian_twos_complement():
  # 2-bit values 1, 2, 3, 0 -> bits 01, 10, 11, 00 from the least significant end: 0b00_11_10_01.
  np.testing.assert_array_equal(pack_int([1, 2, 3, 0], 2), [0b00111001])
  # Signed 4-bit -1 is 0xF in two's complement; 3 then -1 -> low nibble 3, high nibble F.
  np.testing.assert_array_equal(pack_int([3, -1], 4), [0xF3])
  # 3-bit values straddle bytes: 7, 0, 5 -> stream 111 000 101 -> byte0 = 0b01000111, byte1 = 0b1.
  np.testing.assert_array_equal(pack_int([7, 0, 5], 3), [0b01000111, 0b00000001])
  np.testing.assert_array_equal(pack_ternary_2bit([-1, 0, 1, 1, -1]), [0b10100100, 0b00000000])
  # Base 3, digit = t + 1, least significant first: (-1, 0, 1, 1, 0) -> 0 + 1*3 + 2*9 + 2*27 + 1*81.
  np.testing.assert_array_equal(pack_ternary_base3([-1, 0, 1, 1, 0]), [156])


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="do not fit 4 bits"):
    pack_int([16], 4)
  with pytest.raises(ValueError, match="do not fit 2 bits"):
    pack_int([-3], 2)
  with pytest.raises(ValueError, match="bits=5 is unsupported"):
    pack_int([1], 5)
  with pytest.raises(ValueError, match="expects integers"):
    pack_int(np.array([0.5]), 4)
  with pytest.raises(ValueError, match="ternary values must be -1, 0 or 1, found 2"):
    pack_ternary_base3([0, 2])
  with pytest.raises(ValueError, match="does not fit the packed buffer"):
    unpack_int(np.zeros(1, np.uint8), 3, 3, signed=True)
  with pytest.raises(ValueError, match="not a base-3 ternary byte"):
    unpack_ternary_base3(np.array([250], np.uint8), 5)
