"""Fake quantization (ternary, intN) with straight-through gradients, and its integer form for packing."""

# Weights are [..., in, out]; leading dims (e.g. experts) are batch dims with one bit code each. The
# codes are traced data: every path (ternary, intN at a traced width) is computed and the result is
# selected with jnp.where, so a new allocation reuses the compiled function.

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.quant import formats
from moeqjax.quant import granularity as gran
from moeqjax.quant import scale_search
from moeqjax.quant.formats import QuantSpec

_ABSMEAN_EPS = 1e-8  # BitNet b1.58: W / (gamma + eps) stays finite for an all-zero group
_TWN_DELTA_RATIO = 0.7  # TWN threshold delta = 0.7 * mean|W| (the official code uses 0.75)
_FP16_MAX = 65504.0


class _Grid(NamedTuple):
  """A quantized group in grouped form: Q = (q - zero_point) * scale."""

  q: jax.Array  # [..., ng, G, nc] integer-valued floats, already clipped to [lo, hi]
  scale: jax.Array  # [..., ng, 1, nc] the scale used for dequantization (ratio applied)
  zero_point: jax.Array  # [..., ng, 1, nc] integer-valued floats; 0 for symmetric and ternary groups
  base_scale: jax.Array  # [..., ng, 1, nc] scale before the ratio, d(scale)/d(ratio)
  in_range: jax.Array  # [..., ng, G, nc] bool: round(w / scale) + zero_point is in [lo, hi]
  rounded: jax.Array  # [..., ng, G, nc] round(w / scale) (for the LSQ gradient)
  scaled: jax.Array  # [..., ng, G, nc] w / scale (for the LSQ gradient)
  level_max: jax.Array  # [..., 1, 1, 1] the top positive level (LSQ's Q_P): 1, 2^(b-1)-1 or 2^b-1


def _compute_dtype(dtype):
  # Statistics and rounding in at least float32: bf16 would move rounding boundaries.
  return jnp.promote_types(dtype, jnp.float32)


def _check_codes(codes, shape) -> jax.Array:
  """Validates concrete codes on the host and their shape; returns them as an int32 array."""
  lead = tuple(shape[:-2])
  if not isinstance(codes, jax.Array):
    codes = formats.validate_codes(codes)  # concrete host codes can be checked; traced ones cannot
  codes = jnp.asarray(codes, jnp.int32)
  try:
    ok = np.broadcast_shapes(codes.shape, lead) == lead
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(
        f"bit codes of shape {codes.shape} do not broadcast to the leading dims {lead} of weight shape"
        f" {tuple(shape)}; pass one code per leading index (shape {lead}) or a scalar code")
  return codes


def _check_weight_and_clip(w, spec: QuantSpec, clip_ratio):
  """Checks the weight shape against the spec and the clip ratio shape; returns the clip ratio array."""
  gran.grouped_shape(w.shape, spec)
  if clip_ratio is None:
    return None
  clip_ratio = jnp.asarray(clip_ratio, _compute_dtype(w.dtype))
  gran.scales_to_stats(clip_ratio, w.shape, spec)  # raises a fix-it message on a bad shape
  return clip_ratio


def _codes_to_groups(codes, shape) -> jax.Array:
  """Broadcasts checked per-leading-index codes to the grouped form [..., 1, 1, 1]."""
  return jnp.broadcast_to(codes, tuple(shape[:-2]))[..., None, None, None]


def storable_scale(scale, spec: QuantSpec):
  """The scale as it is stored: rounded to float16 when `spec.scale_bytes == 2`, else unchanged.

  The student dequantizes with the stored scale, so a packed checkpoint or an export that keeps our
  codes and fp16 scales reproduces the fake-quant weight exactly (METHODS.md section 7). Scales above
  the float16 range are capped at its maximum rather than becoming inf.
  """
  if spec.scale_bytes == 4:
    return scale
  capped = jnp.minimum(scale, _FP16_MAX)
  return capped.astype(jnp.float16).astype(scale.dtype)


def _int_grid(w_g, code_g, spec: QuantSpec, clip_g):
  """The intN path at the traced width `code_g` (codes below 2 compute at 8 bits and are discarded)."""
  bits = jnp.where(code_g >= 2, code_g, 8)
  # An integer shift keeps 2^b exact; float pow may land one ulp below.
  two_pow_b = jnp.left_shift(jnp.int32(1), bits).astype(w_g.dtype)
  if spec.symmetric:
    qmax = two_pow_b / 2 - 1
    lo, hi = -qmax - 1, qmax
    level_max = qmax
    base = gran.reduce_groups(jnp.abs(w_g), jnp.max) / qmax
    zero_point = jnp.zeros_like(base)
  else:
    levels = two_pow_b - 1
    # The range always includes 0: zero is then exactly representable and the zero point lies in
    # [0, 2^b - 1], so it fits in one unsigned byte.
    w_min = jnp.minimum(gran.reduce_groups(w_g, jnp.min), 0.0)
    w_max = jnp.maximum(gran.reduce_groups(w_g, jnp.max), 0.0)
    base = (w_max - w_min) / levels
    zero_point = jnp.round(-w_min / jnp.where(base > 0, base, 1.0))
    lo, hi = jnp.zeros_like(levels), levels
    level_max = levels
  scale = storable_scale(base if clip_g is None else base * clip_g, spec)
  # An all-zero group has scale 0: divide by 1 instead so q = zero_point and Q = 0.
  scaled = w_g / jnp.where(scale > 0, scale, 1.0)
  rounded = jnp.round(scaled)
  shifted = rounded + zero_point
  in_range = (shifted >= lo) & (shifted <= hi)
  q = jnp.clip(shifted, lo, hi)
  return q, scale, zero_point, base, in_range, rounded, scaled, level_max


def _int_dequant(w_g, code_g, spec: QuantSpec, ratio_g):
  q, scale, zero_point = _int_grid(w_g, code_g, spec, ratio_g)[:3]
  return (q - zero_point) * scale


def _ternary_round(w_g, spec: QuantSpec, ratio_g):
  """Ternary levels round(w / s) in [-1, 1] at s = ratio * mean|W| (LSQ form; ratio 1 is absmean).

  As absmean does, the levels are rounded at the unrounded scale (plus eps) and dequantized with the
  stored one, so ratio 1 gives the absmean weight bit for bit.
  """
  base = gran.reduce_groups(jnp.abs(w_g), jnp.mean)
  raw_scale = base * ratio_g
  scale = storable_scale(raw_scale, spec)
  scaled = w_g / (raw_scale + _ABSMEAN_EPS)
  rounded = jnp.round(scaled)
  return jnp.clip(rounded, -1.0, 1.0), scale, base, jnp.abs(rounded) <= 1.0, rounded, scaled


def _ternary_dequant(w_g, spec: QuantSpec, ratio_g):
  q, scale = _ternary_round(w_g, spec, ratio_g)[:2]
  return q * scale


def _ternary_grid(w_g, spec: QuantSpec):
  """The ternary path: integer levels in {-1, 0, 1} and the group scale."""
  abs_w = jnp.abs(w_g)
  mean_abs = gran.reduce_groups(abs_w, jnp.mean)
  if spec.ternary_method == "absmean":
    q = jnp.clip(jnp.round(w_g / (mean_abs + _ABSMEAN_EPS)), -1.0, 1.0)
    return q, storable_scale(mean_abs, spec)
  kept = abs_w > _TWN_DELTA_RATIO * mean_abs
  count = gran.reduce_groups(kept.astype(w_g.dtype), jnp.sum)
  # An all-zero group keeps nothing; max(count, 1) avoids 0/0 and gives alpha = 0.
  alpha = gran.reduce_groups(jnp.where(kept, abs_w, 0.0), jnp.sum) / jnp.maximum(count, 1.0)
  return jnp.sign(w_g) * kept, storable_scale(alpha, spec)


def _grid(w_g, code_g, spec: QuantSpec, int_ratio_g, ternary_ratio_g) -> _Grid:
  """Quantizes every group at its code; FP groups are handled by the caller."""
  q_i, s_i, zp_i, base_i, in_i, rounded_i, scaled_i, level_max = _int_grid(
      w_g, code_g, spec, int_ratio_g)
  is_ternary = code_g == formats.TERNARY
  if ternary_ratio_g is None:
    q_t, s_t = _ternary_grid(w_g, spec)
    base_t, in_t, rounded_t, scaled_t = base_i, in_i, rounded_i, scaled_i  # no ternary ratio grad
  else:
    q_t, s_t, base_t, in_t, rounded_t, scaled_t = _ternary_round(w_g, spec, ternary_ratio_g)
  pick = functools.partial(jnp.where, is_ternary)
  return _Grid(
      q=pick(q_t, q_i),
      scale=pick(s_t, s_i),
      zero_point=pick(0.0, zp_i),
      base_scale=pick(base_t, base_i),
      in_range=pick(in_t, in_i),
      rounded=pick(rounded_t, rounded_i),
      scaled=pick(scaled_t, scaled_i),
      level_max=pick(1.0, level_max),
  )


def _prepare(w, codes, spec: QuantSpec, clip_ratio):
  """Grouped float weight, grouped codes, and the grouped intN and ternary ratios (or None).

  A learned ratio (`clip_ratio`) sets the intN scales, and the ternary ones under `learn_scale`;
  where none is given and `spec.scale_init == "mse"`, the grid search sets them.
  """
  shape = tuple(w.shape)
  dtype = _compute_dtype(w.dtype)
  w_g = gran.to_groups(w.astype(dtype), spec)
  code_g = _codes_to_groups(codes, shape)
  learned = None if clip_ratio is None else gran.scales_to_stats(clip_ratio.astype(dtype), shape, spec)
  mse = spec.scale_init == "mse"
  int_ratio = learned
  if int_ratio is None and mse:
    int_ratio = scale_search.int_ratio(w_g, lambda r: _int_dequant(w_g, code_g, spec, r))
  ternary_ratio = learned if spec.learn_scale else None
  if ternary_ratio is None and mse:
    ternary_ratio = scale_search.ternary_ratio(w_g, lambda r: _ternary_dequant(w_g, spec, r))
  return w_g, code_g, int_ratio, ternary_ratio


def search_ratio(w, codes, spec: QuantSpec) -> jax.Array:
  """The MSE-optimal ratio per group at each leading index's code (the start of a learned ratio).

  Args:
    w: weight [..., in, out].
    codes: bit codes broadcastable to the leading dims (may be traced).
    spec: the quantization spec (scale_init is ignored: this always searches).

  Returns:
    Ratios of `scale_shape(w.shape, spec)`: intN ratios for int codes, ternary ratios (of mean|W|)
    for code 1, and 1 for full-precision codes.
  """
  w = jnp.asarray(w)
  codes = _check_codes(codes, w.shape)
  gran.grouped_shape(w.shape, spec)
  return _search_ratio(w, codes, spec)


@functools.partial(jax.jit, static_argnums=(2,))
def _search_ratio(w, codes, spec):
  w_g = gran.to_groups(w.astype(_compute_dtype(w.dtype)), spec)
  code_g = _codes_to_groups(codes, w.shape)
  r_int = scale_search.int_ratio(w_g, lambda r: _int_dequant(w_g, code_g, spec, r))
  r_ternary = scale_search.ternary_ratio(w_g, lambda r: _ternary_dequant(w_g, spec, r))
  ratio = jnp.where(code_g == formats.TERNARY, r_ternary, r_int)
  return gran.stats_to_scales(jnp.where(code_g == formats.FP, 1.0, ratio))


def quantize_dequantize(w: jax.Array, codes, spec: QuantSpec, clip_ratio=None) -> jax.Array:
  """Quantizes and dequantizes a weight at per-leading-index bit codes (forward value only).

  Per group: code 0 passes w through; code 1 is ternary (absmean or TWN per `spec.ternary_method`);
  codes 2/3/4/8 are round-to-nearest on a symmetric grid [-qmax-1, qmax] * scale, with
  scale = clip_ratio * max|W| / qmax, or on an asymmetric grid with a zero point. With
  `spec.scale_init == "mse"` and no `clip_ratio`, the ratio is the grid-searched MSE-optimal one
  (moeqjax.quant.scale_search), and ternary groups use round-to-nearest levels at ratio * mean|W|;
  under `spec.learn_scale` a given ratio sets the ternary scales that way too.

  Args:
    w: weight [..., in, out]; leading dims are batch dims (e.g. experts).
    codes: int bit codes broadcastable to the leading dims (e.g. [E] for [E, D, F], [] for [D, F]).
      May be traced; concrete codes are validated.
    spec: the quantization spec.
    clip_ratio: optional clipping ratio in (0, 1], broadcastable to `scale_shape(w.shape, spec)`;
      it multiplies the intN scale and is ignored for ternary and FP codes.

  Returns:
    The dequantized weight, same shape and dtype as w.
  """
  w = jnp.asarray(w)
  codes = _check_codes(codes, w.shape)
  clip_ratio = _check_weight_and_clip(w, spec, clip_ratio)
  return _quantize_dequantize(w, codes, clip_ratio, spec)


# Jitted so that eager callers (tests, export) compile one program instead of dispatching many ops;
# under an outer jit this is simply inlined.
@functools.partial(jax.jit, static_argnums=(3,))
def _quantize_dequantize(w, codes, clip_ratio, spec):
  w_g, code_g, int_ratio, ternary_ratio = _prepare(w, codes, spec, clip_ratio)
  grid = _grid(w_g, code_g, spec, int_ratio, ternary_ratio)
  w_q = (grid.q - grid.zero_point) * grid.scale
  w_q = jnp.where(code_g == formats.FP, w_g, w_q)
  return gran.from_groups(w_q, w.shape).astype(w.dtype)


def fake_quant(w: jax.Array, codes, spec: QuantSpec, clip_ratio=None) -> jax.Array:
  """Fake quantization with a straight-through gradient.

  Without `clip_ratio`: `w + stop_gradient(Q(w) - w)`, so dL/dw = dL/dw_q exactly.
  With `clip_ratio`: a clipped STE (dL/dw is zeroed where an intN weight fell outside the clip range)
  and an LSQ-style gradient for the clip ratio (dQ/ds = round(w/s) - w/s inside the range, the clip
  level minus the zero point outside, chained through s = clip_ratio * base_scale with the base scale
  held constant). FP and ternary elements get a plain STE and contribute nothing to the clip gradient,
  except under `spec.learn_scale`, where ternary groups are learned like intN ones and every ratio
  gradient is scaled by 1 / sqrt(N * Q_P) (LSQ; N weights per scale, Q_P the top level).

  Args:
    w: weight [..., in, out].
    codes: int bit codes broadcastable to the leading dims; may be traced.
    spec: the quantization spec.
    clip_ratio: optional array in (0, 1] broadcastable to `scale_shape(w.shape, spec)`
      (e.g. a scalar, [E, 1, 1] per expert, or the full scale shape per group).

  Returns:
    The fake-quantized weight, same shape and dtype as w.
  """
  w = jnp.asarray(w)
  codes = _check_codes(codes, w.shape)
  clip_ratio = _check_weight_and_clip(w, spec, clip_ratio)
  if clip_ratio is None:
    return _fake_quant_ste(w, codes, spec)
  return _fake_quant_clipped(w, codes, clip_ratio, spec)


@functools.partial(jax.jit, static_argnums=(2,))
def _fake_quant_ste(w, codes, spec):
  # The STE sum runs in float32 and is cast once: in bf16, w + (Q - w) would miss Q by up to an ulp.
  w_f = w.astype(_compute_dtype(w.dtype))
  w_q = _quantize_dequantize(w_f, codes, None, spec)
  return (w_f + jax.lax.stop_gradient(w_q - w_f)).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fake_quant_clipped_vjp(w, codes, clip_ratio, spec):
  return _quantize_dequantize(w, codes, clip_ratio, spec)


def _fake_quant_clipped_fwd(w, codes, clip_ratio, spec):
  # Keep only the inputs: the backward pass recomputes the grid, which is cheaper in memory than
  # saving several weight-sized residuals per expert tensor.
  return _quantize_dequantize(w, codes, clip_ratio, spec), (w, codes, clip_ratio)


def _fake_quant_clipped_bwd(spec, residuals, g):
  w, codes, clip_ratio = residuals
  w_g, code_g, int_ratio, ternary_ratio = _prepare(w, codes, spec, clip_ratio)
  grid = _grid(w_g, code_g, spec, int_ratio, ternary_ratio)
  g_g = gran.to_groups(g.astype(w_g.dtype), spec)
  # The groups whose scale the ratio sets: intN always, ternary under learn_scale.
  learned = (code_g >= 2) | ((code_g == formats.TERNARY) & spec.learn_scale)
  grad_w = jnp.where(learned & ~grid.in_range, 0.0, g_g)
  dq_ds = jnp.where(grid.in_range, grid.rounded - grid.scaled, grid.q - grid.zero_point)
  grad_clip = gran.reduce_groups(jnp.where(learned, g_g * dq_ds, 0.0), jnp.sum) * grid.base_scale
  if spec.learn_scale:  # LSQ gradient scale 1 / sqrt(N * Q_P), N = weights under one scale
    grad_clip = grad_clip * jax.lax.rsqrt(w_g.shape[-2] * grid.level_max)
  grad_clip = _sum_to_shape(gran.stats_to_scales(grad_clip), clip_ratio.shape)
  codes_cotangent = np.zeros(codes.shape, dtype=jax.dtypes.float0)
  return (gran.from_groups(grad_w, w.shape).astype(w.dtype), codes_cotangent,
          grad_clip.astype(clip_ratio.dtype))


_fake_quant_clipped_vjp.defvjp(_fake_quant_clipped_fwd, _fake_quant_clipped_bwd)
_fake_quant_clipped = jax.jit(_fake_quant_clipped_vjp, static_argnums=(3,))


def _sum_to_shape(x, shape):
  """Sums a broadcast result back to the shape it was broadcast from."""
  shape = tuple(shape)
  extra = x.ndim - len(shape)
  x = x.sum(axis=tuple(range(extra))) if extra else x
  axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
  return x.sum(axis=axes, keepdims=True) if axes else x


@jax.jit
def quantize_act_int8(x: jax.Array) -> jax.Array:
  """int8 absmax fake quantization per token (over the last axis), straight-through.

  Args:
    x: activations [..., D].

  Returns:
    round(x * s) / s with s = 127 / max|x_row| (an all-zero row stays zero), same shape and dtype as x;
    the gradient with respect to x is the identity.
  """
  x_f = x.astype(_compute_dtype(x.dtype))
  amax = jnp.max(jnp.abs(x_f), axis=-1, keepdims=True)
  s = 127.0 / jnp.where(amax > 0, amax, 1.0)
  x_q = (jnp.round(x_f * s) / s).astype(x.dtype)
  return x + jax.lax.stop_gradient(x_q - x)


@functools.partial(jax.jit, static_argnums=(3,))
def _int_form(w, codes, clip_ratio, spec):
  w_g, code_g, int_ratio, ternary_ratio = _prepare(w, codes, spec, clip_ratio)
  grid = _grid(w_g, code_g, spec, int_ratio, ternary_ratio)
  return grid.q, grid.scale, grid.zero_point


def quantize_to_ints(w, codes_host, spec: QuantSpec, clip_ratio=None):
  """Integer form of a quantized weight for packing and serving (host side, numpy in and out).

  The values are exactly those of `quantize_dequantize` (the same jax code computes them), so
  `dequantize_ints(*quantize_to_ints(w, c, spec, r), spec, w.shape)` equals
  `quantize_dequantize(w, c, spec, r)`.

  Args:
    w: weight [..., in, out] (numpy or array-like).
    codes_host: numpy int codes broadcastable to the leading dims; every code must be quantized (1..8).
    spec: the quantization spec.
    clip_ratio: optional trained clipping ratio, broadcastable to `scale_shape(w.shape, spec)`; it is
      folded into the returned scales.

  Returns:
    q_int: [..., in, out] integers: ternary in {-1, 0, 1}, symmetric intN in [-qmax-1, qmax], asymmetric
      intN in [0, 2^b - 1]. int8 for symmetric specs; int16 for asymmetric specs because uint8 levels
      (up to 255) and ternary -1 can share one tensor.
    scales: float32 [..., n_in_groups, n_cols] (`scale_shape`).
    zero_points: uint8 [..., n_in_groups, n_cols] for asymmetric specs (0 for ternary groups), else None.

  Raises:
    ValueError: on an unsupported code, a full-precision code (it has no integer form), or a bad shape.
  """
  w = np.asarray(w, np.float32)
  codes = formats.validate_codes(codes_host)
  if np.any(codes == formats.FP):
    raise ValueError(
        "code 0 (full precision) has no integer form; store those weights in bf16 and pass only"
        " quantized codes (1, 2, 3, 4, 8) to quantize_to_ints")
  codes = _check_codes(codes, w.shape)
  clip_ratio = _check_weight_and_clip(w, spec, clip_ratio)  # shape errors before tracing
  q, scale, zero_point = (np.asarray(a) for a in _int_form(w, codes, clip_ratio, spec))
  q_int = gran.from_groups(q, w.shape).astype(np.int8 if spec.symmetric else np.int16)
  scales = gran.stats_to_scales(scale).astype(np.float32)
  zero_points = None if spec.symmetric else gran.stats_to_scales(zero_point).astype(np.uint8)
  return q_int, scales, zero_points


def dequantize_ints(q_int, scales, zero_points, spec: QuantSpec, shape) -> np.ndarray:
  """Inverse of `quantize_to_ints`: (q - zero_point) * scale per group.

  Args:
    q_int: integers with prod(shape) elements (e.g. [..., in, out], or flat after unpacking).
    scales: [..., n_in_groups, n_cols] per-group scales.
    zero_points: per-group zero points of the same shape, or None for symmetric specs.
    spec: the quantization spec used to quantize.
    shape: the weight shape [..., in, out].

  Returns:
    float32 weight of `shape`.
  """
  shape = tuple(int(d) for d in shape)
  q_g = np.asarray(q_int).reshape(gran.grouped_shape(shape, spec)).astype(np.float32)
  s_g = gran.scales_to_stats(np.asarray(scales, np.float32), shape, spec)
  if zero_points is not None:
    q_g = q_g - gran.scales_to_stats(np.asarray(zero_points).astype(np.float32), shape, spec)
  return gran.from_groups(q_g * s_g, shape)
