"""scale_init="mse": the grid search against a numpy brute force, and never worse than absmax/absmean."""

import numpy as np
import pytest

from moeqjax.quant import QuantSpec, quantize_dequantize, quantize_to_ints, search_ratio
from moeqjax.quant import dequantize_ints
from moeqjax.quant.scale_search import RATIO_GRID

E, D_IN, D_OUT, G = 4, 16, 3, 8
CODES = np.array([1, 2, 3, 4], np.int32)  # ternary, int2, int3, int4


def _weights(seed):
  # Student-t tails: outliers make clipping pay off, as in trained weights.
  return np.random.RandomState(seed).standard_t(4, size=(E, D_IN, D_OUT)).astype(np.float32) * 0.1


def _stored(scale, spec):
  scale = np.float32(scale)
  return np.float32(np.float16(scale)) if spec.scale_bytes == 2 else scale


def _ref_dequant(x, code, spec, r):
  """One group quantized at ratio r, from the formulas (float32 numpy)."""
  r = np.float32(r)
  if code == 1:  # round-to-nearest ternary levels at s = r * mean|x|
    raw = np.mean(np.abs(x), dtype=np.float32) * r
    return np.clip(np.round(x / (raw + np.float32(1e-8))), -1, 1) * _stored(raw, spec)
  if spec.symmetric:
    qmax = np.float32(2 ** (code - 1) - 1)
    s = _stored(np.abs(x).max() / qmax * r, spec)
    return np.clip(np.round(x / s), -qmax - 1, qmax) * s
  levels = np.float32(2 ** code - 1)
  lo, hi = min(x.min(), np.float32(0)), max(x.max(), np.float32(0))
  base = (hi - lo) / levels
  zp = np.round(-lo / base)
  s = _stored(base * r, spec)
  return (np.clip(np.round(x / s) + zp, 0, levels) - zp) * s


def _candidates(x, code):
  if code != 1:
    return [np.float32(r) for r in RATIO_GRID]
  mean = np.mean(np.abs(x), dtype=np.float32)
  out = [np.float32(1.0)]
  for t in RATIO_GRID:
    kept = np.abs(x) > np.float32(t) * mean
    out.append(np.abs(x[kept]).mean(dtype=np.float32) / mean if kept.any() else np.float32(1.0))
  return out


def _groups(spec):
  if spec.granularity == "channel":
    return [((slice(None), o), (0, o)) for o in range(D_OUT)]
  return [((slice(k * G, (k + 1) * G), o), (k, o)) for k in range(D_IN // G) for o in range(D_OUT)]


def _sse(a, b):
  return float(np.sum((a.astype(np.float64) - b) ** 2))


@pytest.mark.parametrize("granularity,symmetric,scale_bytes", [
    ("channel", True, 2), ("group", False, 4)])
def test_search_reaches_the_brute_force_minimum(granularity, symmetric, scale_bytes):
  spec = QuantSpec(granularity=granularity, group_size=G, symmetric=symmetric,
                   scale_bytes=scale_bytes, scale_init="mse")
  w = _weights(0)
  ratios = np.asarray(search_ratio(w, CODES, spec))
  w_q = np.asarray(quantize_dequantize(w, CODES, spec))
  moved = 0
  for e, code in enumerate(CODES):
    for idx, (k, o) in _groups(spec):
      x = w[e][idx]
      errs = [_sse(_ref_dequant(x, code, spec, r), x) for r in _candidates(x, code)]
      best = _candidates(x, code)[int(np.argmin(errs))]
      # The library's ratio is the brute force's, and the quantizer uses it.
      np.testing.assert_allclose(ratios[e, k, o], best, rtol=1e-6)
      np.testing.assert_allclose(w_q[e][idx], _ref_dequant(x, code, spec, best), rtol=1e-6,
                                 atol=1e-7)
      moved += best != 1.0
  assert moved > 0  # the search changes something on heavy-tailed weights


@pytest.mark.parametrize("symmetric,scale_bytes", [(True, 2), (False, 2)])
def test_mse_error_is_at_most_absmax_absmean_in_every_group(symmetric, scale_bytes):
  base = QuantSpec(granularity="group", group_size=G, symmetric=symmetric, scale_bytes=scale_bytes)
  mse = QuantSpec(granularity="group", group_size=G, symmetric=symmetric, scale_bytes=scale_bytes,
                  scale_init="mse")
  w = _weights(1)
  err = {}
  for name, spec in (("absmax", base), ("mse", mse)):
    d = (np.asarray(quantize_dequantize(w, CODES, spec)).astype(np.float64) - w) ** 2
    err[name] = d.reshape(E, D_IN // G, G, D_OUT).sum(axis=2)  # per group
  assert np.all(err["mse"] <= err["absmax"])
  for e in range(E):  # strictly better in total for every code
    assert err["mse"][e].sum() < err["absmax"][e].sum()


def test_mse_scales_pack_exactly():
  """The integer form (packing, GGUF, compressed-tensors) carries the searched scales."""
  spec = QuantSpec(granularity="channel", symmetric=False, scale_init="mse")
  w = _weights(2)
  q, scales, zp = quantize_to_ints(w, CODES, spec)
  np.testing.assert_array_equal(dequantize_ints(q, scales, zp, spec, w.shape),
                                np.asarray(quantize_dequantize(w, CODES, spec)))


def test_unknown_scale_init_is_refused():
  with pytest.raises(ValueError, match=r"scale_init='best' is unsupported; choose from"):
    QuantSpec(scale_init="best")
  with pytest.raises(ValueError, match="choose one"):
    QuantSpec(learn_clip=True, learn_scale=True)
