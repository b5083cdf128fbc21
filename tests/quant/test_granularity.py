"""Grouped form of [..., in, out] weights for the three granularities."""

import numpy as np
import pytest

from moeqjax.quant import QuantSpec
from moeqjax.quant import from_groups
from moeqjax.quant import num_groups
from moeqjax.quant import reduce_groups
from moeqjax.quant import scale_shape
from moeqjax.quant import scales_to_stats
from moeqjax.quant import stats_to_scales
from moeqjax.quant import to_groups

W = np.random.RandomState(0).randn(3, 8, 5).astype(np.float32)  # [E, in, out]


def test_group_statistics_match_direct_reductions():
  tensor = reduce_groups(to_groups(W, QuantSpec(granularity="tensor")), np.max)
  np.testing.assert_array_equal(stats_to_scales(tensor)[:, 0, 0], W.max(axis=(1, 2)))
  channel = reduce_groups(to_groups(W, QuantSpec(granularity="channel")), np.max)
  np.testing.assert_array_equal(stats_to_scales(channel)[:, 0, :], W.max(axis=1))
  block = reduce_groups(to_groups(W, QuantSpec(granularity="group", group_size=4)), np.max)
  np.testing.assert_array_equal(stats_to_scales(block)[:, 1, 2], W[:, 4:8, 2].max(axis=1))


@pytest.mark.parametrize("granularity,want_scale_shape", [
    ("tensor", (3, 1, 1)), ("channel", (3, 1, 5)), ("group", (3, 2, 5))])
def test_shapes_and_round_trip(granularity, want_scale_shape):
  spec = QuantSpec(granularity=granularity, group_size=4)
  assert scale_shape(W.shape, spec) == want_scale_shape
  assert num_groups(W.shape, spec) == int(np.prod(want_scale_shape))
  np.testing.assert_array_equal(from_groups(to_groups(W, spec), W.shape), W)
  stats = scales_to_stats(np.float32(2.0), W.shape, spec)  # scalars broadcast to every group
  assert stats.shape == want_scale_shape[:-1] + (1, want_scale_shape[-1]) and np.all(stats == 2.0)


def test_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="group_size=3 does not divide the input dim 8"):
    to_groups(W, QuantSpec(granularity="group", group_size=3))
  with pytest.raises(ValueError, match="fewer than 2 dims"):
    num_groups((8,), QuantSpec())
  with pytest.raises(ValueError, match=r"do not broadcast to the scale shape \(3, 1, 5\)"):
    scales_to_stats(np.ones((3, 2, 5)), W.shape, QuantSpec())
