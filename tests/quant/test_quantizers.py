"""Quantizers against plain-numpy reference formulas, gradients, traced codes and error messages."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax.quant import QuantSpec
from moeqjax.quant import dequantize_ints
from moeqjax.quant import fake_quant
from moeqjax.quant import quantize_act_int8
from moeqjax.quant import quantize_dequantize
from moeqjax.quant import quantize_to_ints
from moeqjax.quant import scale_shape

E, D_IN, D_OUT, G = 6, 16, 5, 8
MIXED_CODES = np.array([0, 1, 2, 3, 4, 8], np.int32)  # one expert per code
GRANULARITIES = ("tensor", "channel", "group")


def _weights(seed=0, shape=(E, D_IN, D_OUT)):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def _groups(w2d, spec):
  """Index arrays of each group of one [in, out] weight, written independently of the library."""
  d_in, d_out = w2d.shape
  if spec.granularity == "tensor":
    return [(slice(None), slice(None))]
  if spec.granularity == "channel":
    return [(slice(None), o) for o in range(d_out)]
  return [(slice(k * spec.group_size, (k + 1) * spec.group_size), o)
          for k in range(d_in // spec.group_size) for o in range(d_out)]


def _stored(scale, spec):
  """A scale as the spec stores it: float16 for scale_bytes=2, float32 for 4 (METHODS.md 7)."""
  scale = np.float32(scale)
  return np.float32(np.float16(scale)) if spec.scale_bytes == 2 else scale


def _ref_group(x, code, spec, clip=1.0):
  """Reference fake quantization of one group (float32 numpy), straight from the formulas."""
  x = x.astype(np.float32)
  clip = np.float32(clip)
  if code == 0:
    return x
  if code == 1:
    mean_abs = np.mean(np.abs(x), dtype=np.float32)
    if spec.ternary_method == "absmean":
      return np.clip(np.round(x / (mean_abs + np.float32(1e-8))), -1, 1) * _stored(mean_abs, spec)
    kept = np.abs(x) > np.float32(0.7) * mean_abs
    alpha = np.abs(x[kept]).mean(dtype=np.float32) if kept.any() else np.float32(0)
    return _stored(alpha, spec) * np.sign(x) * kept
  if spec.symmetric:
    qmax = np.float32(2 ** (code - 1) - 1)
    scale = _stored(np.max(np.abs(x)) / qmax * clip, spec)
    if scale == 0:
      return np.zeros_like(x)
    return np.clip(np.round(x / scale), -qmax - 1, qmax) * scale
  levels = np.float32(2 ** code - 1)
  lo, hi = min(x.min(), np.float32(0)), max(x.max(), np.float32(0))
  base = (hi - lo) / levels
  if base == 0:
    return np.zeros_like(x)
  zp = np.round(-lo / base)
  scale = _stored(base * clip, spec)
  return (np.clip(np.round(x / scale) + zp, 0, levels) - zp) * scale


def _ref_qdq(w, codes, spec, clip_E=None):
  out = np.empty_like(w)
  for e in range(w.shape[0]):
    for idx in _groups(w[e], spec):
      clip = 1.0 if clip_E is None else clip_E[e]
      out[e][idx] = _ref_group(w[e][idx], int(codes[e]), spec, clip)
  return out


@pytest.mark.parametrize("granularity,symmetric,method,scale_bytes", list(itertools.product(
    GRANULARITIES, (True, False), ("absmean", "twn"), (2, 4))))
def test_quantize_dequantize_matches_reference_for_mixed_codes(granularity, symmetric, method,
                                                               scale_bytes):
  spec = QuantSpec(granularity=granularity, group_size=G, symmetric=symmetric, ternary_method=method,
                   scale_bytes=scale_bytes)
  w = _weights()
  got = np.asarray(quantize_dequantize(jnp.asarray(w), jnp.asarray(MIXED_CODES), spec))
  np.testing.assert_allclose(got, _ref_qdq(w, MIXED_CODES, spec), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(got[0], w[0])  # FP expert is untouched, bit for bit


@pytest.mark.parametrize("granularity,symmetric", list(itertools.product(GRANULARITIES, (True, False))))
def test_clip_ratio_scales_the_int_grid(granularity, symmetric):
  spec = QuantSpec(granularity=granularity, group_size=G, symmetric=symmetric)
  w = _weights(1)
  clip_E = np.linspace(0.5, 1.0, E).astype(np.float32)
  got = quantize_dequantize(w, MIXED_CODES, spec, clip_ratio=clip_E[:, None, None])
  np.testing.assert_allclose(np.asarray(got), _ref_qdq(w, MIXED_CODES, spec, clip_E), rtol=1e-5,
                             atol=1e-6)


def test_levels_per_group_are_bounded_by_the_code():
  spec = QuantSpec(granularity="group", group_size=32)
  w = _weights(2, (E, 64, 3))
  got = np.asarray(quantize_dequantize(w, MIXED_CODES, spec))
  for e, code in enumerate(MIXED_CODES[1:], start=1):
    for k, o in itertools.product(range(2), range(3)):
      n_levels = len(np.unique(got[e, 32 * k:32 * (k + 1), o]))
      assert n_levels <= (3 if code == 1 else 2 ** code), (code, n_levels)
      assert n_levels >= 3  # a real grid, not a collapsed one
  # Ternary absmean values are exactly {-gamma, 0, +gamma} of the group.
  block = w[1, :32, 0]
  gamma = np.float16(np.abs(block).mean(dtype=np.float32))  # stored as a float16 scale
  np.testing.assert_allclose(np.unique(np.abs(got[1, :32, 0])), [0.0, gamma], rtol=1e-6)


@pytest.mark.parametrize("scale_bytes", (2, 4))
def test_scales_are_exactly_the_stored_dtype(scale_bytes):
  """The student dequantizes with the scale that gets stored, so packing loses nothing."""
  spec = QuantSpec(granularity="group", group_size=G, symmetric=False, scale_bytes=scale_bytes)
  w = _weights(5)[1:] * np.float32(0.0371)  # scales that are not float16 numbers
  _, scales, _ = quantize_to_ints(w, MIXED_CODES[1:], spec)
  as_fp16 = scales.astype(np.float16).astype(np.float32)
  if scale_bytes == 2:
    np.testing.assert_array_equal(scales, as_fp16)
  else:  # float32 scales are kept as computed, and most are not float16 numbers
    assert np.mean(scales != as_fp16) > 0.5


def test_huge_scales_are_capped_at_the_float16_range():
  spec = QuantSpec(granularity="tensor")  # fp16 scales
  w = np.array([[-1e7, 1e5]], np.float32)  # absmax / 127 = 78740 > 65504
  got = np.asarray(quantize_dequantize(w, 8, spec))
  np.testing.assert_array_equal(got, [[-128 * 65504.0, 2 * 65504.0]])


def test_symmetric_int2_uses_levels_minus_two_to_one():
  spec = QuantSpec(granularity="tensor")
  w = np.array([[-1.0, -0.6], [0.3, 1.0]], np.float32)  # scale = 1 / qmax = 1
  got = np.asarray(quantize_dequantize(w, 2, spec, clip_ratio=0.5))  # scale 0.5: -1 -> -2 * 0.5
  np.testing.assert_allclose(got, [[-1.0, -0.5], [0.5, 0.5]])


def test_all_zero_group_gives_zeros_and_finite_gradients():
  for symmetric, method in ((True, "absmean"), (False, "twn")):  # every path meets a zero group
    spec = QuantSpec(granularity="group", group_size=G, symmetric=symmetric, ternary_method=method)
    w = _weights(3)
    w[:, :G, :] = 0.0  # first group of every channel is all zero
    got = np.asarray(quantize_dequantize(w, MIXED_CODES, spec))
    assert np.all(got[:, :G, :] == 0.0)
    assert np.all(np.isfinite(got))
    loss = lambda w_, c_: fake_quant(w_, MIXED_CODES, spec, c_).sum()
    g_w, g_c = jax.grad(loss, argnums=(0, 1))(jnp.asarray(w), jnp.full((E, 1, 1), 0.9))
    assert np.all(np.isfinite(g_w)) and np.all(np.isfinite(g_c))


def test_bfloat16_weights_are_quantized_in_float32_and_cast_back():
  spec = QuantSpec(granularity="channel")
  w = jnp.asarray(_weights(4), jnp.bfloat16)
  got = quantize_dequantize(w, MIXED_CODES, spec)
  assert got.dtype == jnp.bfloat16
  want = quantize_dequantize(w.astype(jnp.float32), MIXED_CODES, spec).astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  # The STE forward equals the quantized value in bf16 too, and its gradient is still the identity.
  ste = fake_quant(w, MIXED_CODES, spec)
  assert ste.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ste, np.float32), np.asarray(want, np.float32))
  c = jnp.asarray(_weights(5), jnp.bfloat16)
  grad = jax.grad(lambda w_: (fake_quant(w_, MIXED_CODES, spec) * c).astype(jnp.float32).sum())(w)
  np.testing.assert_array_equal(np.asarray(grad, np.float32), np.asarray(c, np.float32))


def test_traced_codes_do_not_recompile():
  spec = QuantSpec(granularity="group", group_size=G)
  traces = []

  @jax.jit
  def f(w, codes):
    traces.append(1)  # runs once per trace
    return quantize_dequantize(w, codes, spec)

  w = _weights(5)
  codes_a = np.array([1, 2, 3, 4, 8, 0], np.int32)
  codes_b = np.array([8, 1, 0, 2, 4, 3], np.int32)
  out_a, out_b = f(w, codes_a), f(w, codes_b)
  assert f._cache_size() == 1 and len(traces) == 1
  np.testing.assert_allclose(np.asarray(out_a), _ref_qdq(w, codes_a, spec), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out_b), _ref_qdq(w, codes_b, spec), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(out_a), np.asarray(out_b))


def test_scalar_code_on_a_plain_matrix():
  spec = QuantSpec(granularity="channel")
  w = _weights(6, (D_IN, D_OUT))
  got = np.asarray(jax.jit(lambda w, c: quantize_dequantize(w, c, spec))(w, jnp.int32(4)))
  np.testing.assert_allclose(got, _ref_qdq(w[None], [4], spec)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_ste_gradient_is_the_identity(granularity):
  spec = QuantSpec(granularity=granularity, group_size=G)
  w = jnp.asarray(_weights(7))
  c = jnp.asarray(np.random.RandomState(8).randn(*w.shape).astype(np.float32))
  grad = jax.jit(jax.grad(lambda w_, codes: (fake_quant(w_, codes, spec) * c).sum()))(w, MIXED_CODES)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(c))
  # The forward value is the quantized weight.
  np.testing.assert_allclose(np.asarray(fake_quant(w, MIXED_CODES, spec)),
                             np.asarray(quantize_dequantize(w, MIXED_CODES, spec)), atol=1e-6)


def _ref_clip_grads(w, codes, spec, clip_groups, cot):
  """Numpy oracle of the clipped STE + LSQ clip gradient, per group.

  Returns grad_w like w and grad_clip shaped like the per-group scale (scale_shape).
  With `spec.learn_scale` ternary groups are learned too (levels round(w / s) in [-1, 1] at
  s = r * mean|w|) and every ratio gradient is scaled by 1 / sqrt(N * Q_P) (LSQ, Esser et al. 2020).
  """
  grad_w = cot.copy()
  grad_clip = np.zeros(clip_groups.shape, np.float64)
  for e in range(w.shape[0]):
    code = int(codes[e])
    if code == 0 or (code == 1 and not spec.learn_scale):
      continue
    for gi, idx in enumerate(_groups(w[e], spec)):
      # float32 like the library, so that rounding and clipping decisions agree bit for bit
      x, g = w[e][idx], cot[e][idx].astype(np.float64)
      k, o = (gi // w.shape[-1], gi % w.shape[-1]) if spec.granularity == "group" else (0, gi)
      r = clip_groups[e, k, o]
      if code == 1:
        base = np.mean(np.abs(x), dtype=np.float32)
        v = np.round(x / (base * r + np.float32(1e-8)))
        inside = np.abs(v) <= 1
        dq_ds = np.where(inside, v - x / (base * r + np.float32(1e-8)), np.clip(v, -1, 1))
        level_max = 1
      elif spec.symmetric:
        qmax = np.float32(2 ** (code - 1) - 1)
        lo, hi, zp, base = -qmax - 1, qmax, np.float32(0), np.abs(x).max() / qmax
      else:
        lo, hi = np.float32(0), np.float32(2 ** code - 1)
        xmin, xmax = min(x.min(), np.float32(0)), max(x.max(), np.float32(0))
        base = (xmax - xmin) / hi
        zp = np.round(-xmin / base)
      if code >= 2:
        s = _stored(base * r, spec)  # d(stored s)/dr is taken straight through as base
        v = np.round(x / s) + zp
        inside = (v >= lo) & (v <= hi)
        dq_ds = np.where(inside, np.round(x / s) - x / s, np.clip(v, lo, hi) - zp)
        level_max = hi
      lsq = 1 / np.sqrt(x.size * float(level_max)) if spec.learn_scale else 1.0
      grad_clip[e, k, o] = np.sum(g * dq_ds.astype(np.float64)) * float(base) * lsq
      gw = grad_w[e][idx]
      gw[~inside] = 0.0
      grad_w[e][idx] = gw
  return grad_w, grad_clip


def _gradients_and_oracle(spec, seed, low, high):
  """(grad_w, grad_ratio) of a random linear loss of fake_quant at ratios in [low, high], and the
  oracle's (_ref_clip_grads)."""
  w = _weights(seed)
  rng = np.random.RandomState(seed + 1)
  cot = rng.randn(*w.shape).astype(np.float32)
  ratio = rng.uniform(low, high, scale_shape(w.shape, spec)).astype(np.float32)
  loss = lambda w_, r_: (fake_quant(w_, MIXED_CODES, spec, r_) * cot).sum()
  g_w, g_r = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(w), jnp.asarray(ratio))
  return (np.asarray(g_w), np.asarray(g_r), *_ref_clip_grads(w, MIXED_CODES, spec, ratio, cot))


@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group", True),
                                                   ("group", False), ("tensor", False)])
def test_clipped_ste_and_lsq_clip_gradient_match_the_oracle(granularity, symmetric):
  spec = QuantSpec(granularity=granularity, group_size=G, symmetric=symmetric, learn_clip=True)
  g_w, g_c, want_w, want_c = _gradients_and_oracle(spec, 9, 0.45, 0.8)
  np.testing.assert_array_equal(np.asarray(g_w), want_w)  # exact zeros outside the clip range
  assert np.sum(np.asarray(g_w) == 0) > 10  # the clip ratios really clip something
  np.testing.assert_allclose(np.asarray(g_c), want_c, rtol=1e-4, atol=1e-4)
  assert np.all(np.asarray(g_c)[:2] == 0)  # FP and ternary experts get no clip gradient


@pytest.mark.parametrize("granularity,symmetric", [("channel", True), ("group", False)])
def test_learned_scale_lsq_gradient_matches_the_oracle(granularity, symmetric):
  """learn_scale: ternary and intN ratios (around their MSE ratios, some above 1) get the LSQ
  gradient with its 1 / sqrt(N * Q_P) scale; weights outside the grid get none."""
  spec = QuantSpec(granularity=granularity, group_size=G, symmetric=symmetric, learn_scale=True)
  g_w, g_r, want_w, want_r = _gradients_and_oracle(spec, 13, 0.6, 1.6)
  np.testing.assert_array_equal(np.asarray(g_w), want_w)
  assert np.sum(np.asarray(g_w)[1] == 0) > 5  # ternary weights beyond 1.5 s get no gradient
  np.testing.assert_allclose(np.asarray(g_r), want_r, rtol=1e-4, atol=1e-5)
  assert np.all(np.asarray(g_r)[0] == 0) and np.all(np.asarray(g_r)[1] != 0)  # FP none, ternary all


def test_ternary_scale_gradient_matches_finite_differences():
  # Ternary weights beyond 1.5 s are Q = sign(w) * r * mean|w|, linear in the ratio: the LSQ
  # gradient (times sqrt(N * 1), undoing its scale) equals the finite difference. float32 scales.
  spec = QuantSpec(granularity="channel", scale_bytes=4, learn_scale=True)
  w = _weights(15, (1, D_IN, D_OUT))
  codes = np.array([1], np.int32)
  ratio = np.float32(0.8)
  mean_abs = np.abs(w).mean(axis=1, keepdims=True)
  h = 1e-2  # float32 sums: a smaller step drowns in rounding
  clipped = np.abs(w) > 1.5 * mean_abs * (ratio + 2 * h)  # stays clipped over the whole step
  assert clipped.sum() >= 3
  cot = np.where(clipped, np.random.RandomState(16).randn(*w.shape), 0.0).astype(np.float32)
  loss = lambda r_: (fake_quant(jnp.asarray(w), codes, spec, r_) * cot).sum()
  grad = float(jax.grad(loss)(jnp.float32(ratio))) * np.sqrt(D_IN)
  fd = (float(loss(jnp.float32(ratio + h))) - float(loss(jnp.float32(ratio - h)))) / (2 * h)
  np.testing.assert_allclose(grad, fd, rtol=1e-4)
  np.testing.assert_allclose(grad, np.sum(cot * np.sign(w) * mean_abs), rtol=1e-5)  # d(r m)/dr


def test_clip_gradient_of_clipped_weights_matches_finite_differences():
  # Clipped weights are Q = level * clip * base, linear in the clip ratio, so the LSQ gradient of a
  # loss that only looks at clipped weights must equal the finite difference exactly (up to float).
  # float32 scales: a float16-stored scale is a staircase in the clip ratio at the 2^-11 level,
  # which a finite difference would see and the straight-through gradient does not.
  spec = QuantSpec(granularity="channel", scale_bytes=4)
  w = _weights(11, (1, D_IN, D_OUT))
  codes = np.array([3], np.int32)
  clip = np.float32(0.5)
  rounded = np.round(w / (np.abs(w).max(axis=1, keepdims=True) / 3 * clip))
  clipped = (rounded < -4) | (rounded > 3)
  assert clipped.sum() >= 3
  cot = np.where(clipped, np.random.RandomState(12).randn(*w.shape), 0.0).astype(np.float32)
  loss = lambda c_: (fake_quant(jnp.asarray(w), codes, spec, c_) * cot).sum()
  grad = float(jax.grad(loss)(jnp.float32(clip)))
  h = 1e-3  # small enough that no weight crosses a rounding or clipping boundary
  fd = (float(loss(jnp.float32(clip + h))) - float(loss(jnp.float32(clip - h)))) / (2 * h)
  assert grad != 0.0
  np.testing.assert_allclose(grad, fd, rtol=1e-3)


def test_clip_gradient_sums_over_broadcast_dims():
  spec = QuantSpec(granularity="group", group_size=G)
  w = jnp.asarray(_weights(13))
  loss = lambda c_: fake_quant(w, MIXED_CODES, spec, c_).sum()
  full = jax.grad(loss)(jnp.full(scale_shape(w.shape, spec), 0.7))
  per_expert = jax.grad(loss)(jnp.full((E, 1, 1), 0.7))
  scalar = jax.grad(loss)(jnp.float32(0.7))
  assert per_expert.shape == (E, 1, 1) and scalar.shape == ()
  np.testing.assert_allclose(np.asarray(per_expert)[:, 0, 0], np.asarray(full).sum(axis=(1, 2)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(scalar), float(np.asarray(full).sum()), rtol=1e-5)


@pytest.mark.parametrize("granularity,symmetric,method,clip", [
    ("tensor", True, "absmean", None), ("channel", False, "twn", None), ("group", True, "twn", 0.6),
    ("group", False, "absmean", 0.7)])
def test_integer_form_round_trips_to_the_fake_quant_value(granularity, symmetric, method, clip):
  spec = QuantSpec(granularity=granularity, group_size=G, symmetric=symmetric, ternary_method=method)
  w = _weights(14)
  codes = np.array([1, 2, 3, 4, 8, 1], np.int32)
  clip_ratio = None if clip is None else np.full((E, 1, 1), clip, np.float32)
  q_int, scales, zero_points = quantize_to_ints(w, codes, spec, clip_ratio)
  assert q_int.dtype == (np.int8 if symmetric else np.int16) and q_int.shape == w.shape
  assert scales.shape == scale_shape(w.shape, spec)
  for e, code in enumerate(codes):
    lo, hi = (-1, 1) if code == 1 else ((-2 ** (code - 1), 2 ** (code - 1) - 1) if symmetric
                                        else (0, 2 ** code - 1))
    assert lo <= q_int[e].min() and q_int[e].max() <= hi
  if symmetric:
    assert zero_points is None
  else:
    assert zero_points.dtype == np.uint8 and np.all(zero_points[codes == 1] == 0)
  back = dequantize_ints(q_int, scales, zero_points, spec, w.shape)
  want = np.asarray(quantize_dequantize(w, codes, spec, clip_ratio))
  np.testing.assert_allclose(back, want, rtol=1e-6, atol=0)
  back_flat = dequantize_ints(q_int.reshape(-1), scales, zero_points, spec, w.shape)
  np.testing.assert_array_equal(back_flat, back)


def test_activation_int8_matches_formula_and_passes_gradients():
  x = np.random.RandomState(15).randn(3, 4, 16).astype(np.float32)
  x[1, 2] = 0.0  # an all-zero token stays zero
  got = np.asarray(quantize_act_int8(jnp.asarray(x)))
  amax = np.abs(x).max(axis=-1, keepdims=True)
  s = np.float32(127) / np.where(amax > 0, amax, 1)
  np.testing.assert_allclose(got, np.round(x * s) / s, rtol=1e-6, atol=1e-7)
  assert np.all(got[1, 2] == 0)
  assert max(len(np.unique(row)) for row in got.reshape(-1, 16)) <= 255
  c = np.random.RandomState(16).randn(*x.shape).astype(np.float32)
  grad = jax.grad(lambda x_: (quantize_act_int8(x_) * c).sum())(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(grad), c)


def test_unsupported_code_is_rejected_with_its_index():
  with pytest.raises(ValueError, match=r"unsupported bit code 5 at index \(2,\); choose from 0"):
    quantize_dequantize(_weights(), np.array([0, 1, 5, 2, 4, 8]), QuantSpec())
  with pytest.raises(ValueError, match="unsupported bit code 7"):
    fake_quant(_weights(), 7, QuantSpec(), clip_ratio=0.9)


def test_bad_shapes_are_rejected_with_a_fix():
  with pytest.raises(ValueError, match="group_size=32 does not divide the input dim 16"):
    quantize_dequantize(_weights(), MIXED_CODES, QuantSpec(granularity="group", group_size=32))
  with pytest.raises(ValueError, match="do not broadcast to the leading dims"):
    quantize_dequantize(_weights(), np.array([1, 2, 4]), QuantSpec())
  with pytest.raises(ValueError, match="do not broadcast to the scale shape"):
    fake_quant(_weights(), MIXED_CODES, QuantSpec(), clip_ratio=jnp.ones((E, D_IN, 1)))
  with pytest.raises(ValueError, match="fewer than 2 dims"):
    quantize_dequantize(np.ones(4, np.float32), 4, QuantSpec())
  with pytest.raises(ValueError, match="has no integer form"):
    quantize_to_ints(_weights(), MIXED_CODES, QuantSpec())
