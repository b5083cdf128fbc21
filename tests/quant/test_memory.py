"""Memory accounting: formula vs real packed buffers, hand-computed sizes, and expert totals."""

import itertools

import numpy as np
import pytest

from moeqjax.quant import QuantSpec
from moeqjax.quant import VALID_CODES
from moeqjax.quant import expert_bytes
from moeqjax.quant import packed_weight_bytes
from moeqjax.quant import weight_bytes


@pytest.mark.parametrize("granularity,symmetric", list(itertools.product(
    ("tensor", "channel", "group"), (True, False))))
def test_formula_matches_real_packed_buffers(granularity, symmetric):
  # Odd sizes, so the per-tensor ceil of 3-bit and base-3 packing is exercised.
  packing_choice = "base3" if symmetric else "2bit"
  spec = QuantSpec(granularity=granularity, group_size=4, symmetric=symmetric,
                   ternary_packing=packing_choice, scale_bytes=2 if symmetric else 4)
  rng = np.random.RandomState(0)
  for shape in ((12, 3), (20, 7)):
    w = rng.randn(*shape).astype(np.float32)
    for code in VALID_CODES:
      assert packed_weight_bytes(w, code, spec) == weight_bytes(shape, code, spec), (shape, code)


def test_weight_bytes_hand_computed():
  shape = (64, 16)  # 1024 weights, 16 output channels
  channel = QuantSpec(granularity="channel")
  assert weight_bytes(shape, 0, channel) == 2048  # bf16, no scales
  assert weight_bytes(shape, 1, channel) == 256 + 16 * 2  # 4 trits per byte + fp16 scales
  assert weight_bytes(shape, 1, QuantSpec(ternary_packing="base3")) == 205 + 32  # ceil(1024 / 5)
  assert weight_bytes(shape, 3, channel) == 384 + 32
  assert weight_bytes(shape, 4, channel) == 512 + 32
  group_asym = QuantSpec(granularity="group", group_size=32, symmetric=False)
  assert weight_bytes(shape, 4, group_asym) == 512 + 32 * 2 + 32  # 32 groups: scales + zero points
  assert weight_bytes(shape, 1, group_asym) == 256 + 32 * 2  # ternary never stores a zero point
  assert weight_bytes(shape, 8, QuantSpec(granularity="tensor", scale_bytes=4)) == 1024 + 4


def test_expert_bytes_totals_and_averages():
  shapes = {"w_in": (64, 16), "w_out": (16, 64)}  # channel scales: 16 and 64 per expert weight
  codes_LxE = np.array([[1, 4], [8, 0]])
  got = expert_bytes(shapes, codes_LxE, QuantSpec(granularity="channel"))
  ternary, int4, int8, fp = 256 + 32 + 256 + 128, 512 + 32 + 512 + 128, 1024 + 32 + 1024 + 128, 4096
  assert got["total_bytes"] == ternary + int4 + int8 + fp == 8160
  assert got["num_weights"] == 4 * 2048
  assert got["bits_per_weight"] == pytest.approx(8 * 8160 / 8192)
  assert got["avg_code_bits"] == pytest.approx((2 + 4 + 8 + 16) / 4)
  assert got["bytes_per_layer"] == [ternary + int4, int8 + fp]


def test_bad_inputs_are_rejected():
  with pytest.raises(ValueError, match="unsupported bit code 6"):
    weight_bytes((8, 8), 6, QuantSpec())
  with pytest.raises(ValueError, match="group_size=32 does not divide the input dim 48"):
    weight_bytes((48, 8), 4, QuantSpec(granularity="group", group_size=32))
  with pytest.raises(ValueError, match=r"\[num_layers, num_experts\]"):
    expert_bytes({"w_in": (8, 8)}, np.array([4, 4]), QuantSpec())
  with pytest.raises(ValueError, match="expected one bit code"):
    packed_weight_bytes(np.ones((8, 8), np.float32), [4, 4], QuantSpec())
