"""GPTQ (Frantar et al. 2022) on our quantizer grids: row-by-row rounding with Hessian error feedback."""

# Our kernels are [in, out], so GPTQ's "columns" (input features) are our rows: row i is quantized
# with its group's grid, and its rounding error, divided by U[i, i], is fed back into the rows
# after it through U[i, i+1:], where U is the upper Cholesky factor of H^-1 (H = 2 X^T X).
# Rows are processed in blocks ("lazy batch"): errors update the rest of the block row by row and
# the rows after the block in one matmul, which is the same arithmetic as the unblocked loop.
#
# The grid of a group (its scale, zero point, ternary threshold) is fixed when the loop reaches the
# group's first row, from the weights as updated so far (GPTQ's groupsize option); per channel and
# per tensor it comes from the whole weight before the loop. Symmetric intN uses all 2^b levels,
# [-qmax-1, qmax], at the reference code's scale 2 absmax / (2^b - 1) (int2 is {-2, -1, 0, 1} * s,
# not ternary). With scale_init="mse" each group's scale ratio is the MSE-optimal one at that point
# (scale_search, as the fake quantizer searches), and GPTQ runs on both grids and keeps, per output
# column (per tensor: per expert), the one with the lower output error, so it is never worse than
# the absmax grid. Since the scaled errors e satisfy (W - W_hat)^T H_damped (W - W_hat) = e^T e
# per column, the damped output error is known without H.
#
# The output is our integer form (the layout of quantizers.quantize_to_ints) with storable (fp16)
# scales, so it packs and exports exactly. The fake quantizer re-derives grids from weights, and
# the absmax of a weight on the full grid cannot reach -qmax-1 (its scale is absmax / qmax), so
# a symmetric intN result is stored as w_hat plus a fixed ratio per group (`exact_ratio`,
# qmax * s / max|w_hat|, in the `*_clip` params under quant.stored_ratio) that makes the fake
# quantizer's scale GPTQ's. Asymmetric grids keep their end levels at the elements that set the
# group's min and max, so the grid re-derived from w_hat (ratio 1) is the one used; ternary
# re-derives from w_hat itself (absmean: see `exact_latent`; the MSE search recovers a 3-level
# weight's scale). A group whose levels are all 0 is stored with scale 0 (its weight is 0).

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.quant import formats
from moeqjax.quant import granularity as gran
from moeqjax.quant import scale_search
from moeqjax.quant.formats import QuantSpec
# The same constants and ternary MSE quantizer as the fake quantizer (one definition).
from moeqjax.quant.quantizers import (_ABSMEAN_EPS, _TWN_DELTA_RATIO, _int_form, _ternary_dequant,
                                      storable_scale)

DEFAULT_DAMP = 0.01  # lambda: H + lambda * mean(diag H) * I, as in the GPTQ reference code
DEFAULT_BLOCK = 128  # rows per lazy-batch block


class GptqResult(NamedTuple):
  """GPTQ output for weights [..., in, out] (leading dims are experts)."""

  q: jax.Array  # [..., in, out] integer-valued: ternary {-1,0,1}, sym [-qmax-1, qmax], asym [0, 2^b-1]
  scale: jax.Array  # [..., n_in_groups, n_cols] storable scales (scale_shape)
  zero_point: jax.Array  # [..., n_in_groups, n_cols] (0 for symmetric and ternary)
  w_hat: jax.Array  # [..., in, out] (q - zero_point) * scale; the input weight where the code is 0
  searched: jax.Array  # [..., n_cols] bool: the column kept the MSE grid (scale_init="mse")


class _GroupGrid(NamedTuple):
  scale: jax.Array  # [out] dequantization scale (storable)
  zero: jax.Array  # [out] intN zero point
  int_div: jax.Array  # [out] intN divisor (scale, 1 where 0)
  tern_div: jax.Array  # [out] ternary divisor (mean|w| + eps, or ratio * mean|w| + eps) or TWN threshold
  anchor: jax.Array  # [rows, out] bool: this element keeps `anchor_level` (asymmetric intN)
  anchor_level: jax.Array  # [rows, out]


def _bits_and_range(code, dtype, symmetric: bool):
  bits = jnp.where(code >= 2, code, 8)
  two_pow_b = jnp.left_shift(jnp.int32(1), bits).astype(dtype)
  if symmetric:
    qmax = two_pow_b / 2 - 1
    return -qmax - 1, qmax
  return jnp.zeros_like(two_pow_b), two_pow_b - 1


def _onehot_arg(values_g, op):
  """One-hot [ng=1, len, nc] of the arg-`op` along the group axis of a grouped array."""
  idx = op(values_g, axis=-2, keepdims=True)
  return jnp.arange(values_g.shape[-2])[None, :, None] == idx


def _group_grid(rows, code, spec: QuantSpec) -> _GroupGrid:
  """The grid of one group of rows [R, out] (all rows of the weight per channel / per tensor)."""
  w_g = gran.to_groups(rows, spec) if spec.granularity != "group" else rows[None]
  n_out = rows.shape[-1]
  search = spec.scale_init == "mse"

  def cols(stat):  # [1, 1, nc] -> [out] (nc is 1 per tensor)
    return jnp.broadcast_to(stat.reshape(-1), (n_out,))

  def elems(mask_g):
    return mask_g.reshape(rows.shape)

  lo, hi = _bits_and_range(code, rows.dtype, spec.symmetric)
  if spec.symmetric:
    # The reference code's symmetric grid: 2^b levels spanning [-absmax, absmax] (-qmax-1 and qmax
    # sit half a step outside it), scale 2 absmax / (2^b - 1) = absmax / (qmax + 0.5).
    base = gran.reduce_groups(jnp.abs(w_g), jnp.max) / (hi + 0.5)
    zero = jnp.zeros_like(base)
    anchor = jnp.zeros(w_g.shape, bool)
    level = jnp.zeros_like(w_g)
  else:
    w_min = jnp.minimum(gran.reduce_groups(w_g, jnp.min), 0.0)
    w_max = jnp.maximum(gran.reduce_groups(w_g, jnp.max), 0.0)
    base = (w_max - w_min) / hi
    zero = jnp.round(-w_min / jnp.where(base > 0, base, 1.0))
    at_max = _onehot_arg(w_g, jnp.argmax) & (w_max > 0)
    at_min = _onehot_arg(w_g, jnp.argmin) & (w_min < 0)
    anchor = at_max | at_min
    level = jnp.broadcast_to(jnp.where(at_max, hi, 0.0), w_g.shape)

  def int_dequant(ratio):  # the zero point stays base's, as in the fake quantizer's search
    scale = storable_scale(base * ratio, spec)
    q = jnp.clip(jnp.round(w_g / jnp.where(scale > 0, scale, 1.0)) + zero, lo, hi)
    return (q - zero) * scale

  int_ratio = scale_search.int_ratio(w_g, int_dequant) if search else 1.0
  int_scale = storable_scale(base * int_ratio, spec)

  mean_abs = gran.reduce_groups(jnp.abs(w_g), jnp.mean)
  if search:  # the fake quantizer's MSE ternary: round(w / s) at s = ratio * mean|W|
    raw = mean_abs * scale_search.ternary_ratio(w_g, lambda r: _ternary_dequant(w_g, spec, r))
    tern_div, tern_scale = raw + _ABSMEAN_EPS, storable_scale(raw, spec)
  elif spec.ternary_method == "absmean":
    tern_div, tern_scale = mean_abs + _ABSMEAN_EPS, storable_scale(mean_abs, spec)
  else:
    delta = _TWN_DELTA_RATIO * mean_abs
    kept = jnp.abs(w_g) > delta
    count = gran.reduce_groups(kept.astype(w_g.dtype), jnp.sum)
    alpha = gran.reduce_groups(jnp.where(kept, jnp.abs(w_g), 0.0), jnp.sum) / jnp.maximum(count, 1.0)
    tern_div, tern_scale = delta, storable_scale(alpha, spec)

  is_ternary = code == formats.TERNARY
  return _GroupGrid(
      scale=cols(jnp.where(is_ternary, tern_scale, int_scale)),
      zero=cols(zero),
      int_div=cols(jnp.where(int_scale > 0, int_scale, 1.0)),
      tern_div=cols(tern_div),
      anchor=elems(anchor & ~is_ternary),
      anchor_level=elems(level))


def _quantize_row(w, r, grid: _GroupGrid, code, spec: QuantSpec):
  """Integer levels and dequantized values of one row [out] at row `r` of its group."""
  lo, hi = _bits_and_range(code, w.dtype, spec.symmetric)
  q_int = jnp.clip(jnp.round(w / grid.int_div) + grid.zero, lo, hi)
  q_int = jnp.where(grid.anchor[r], grid.anchor_level[r], q_int)
  if spec.ternary_method == "absmean" or spec.scale_init == "mse":
    q_tern = jnp.clip(jnp.round(w / grid.tern_div), -1.0, 1.0)
  else:
    q_tern = jnp.sign(w) * (jnp.abs(w) > grid.tern_div)
  is_ternary = code == formats.TERNARY
  q = jnp.where(is_ternary, q_tern, q_int)
  zero = jnp.where(is_ternary, 0.0, grid.zero)
  deq = jnp.where(code == formats.FP, w, (q - zero) * grid.scale)
  return q, deq


def _quantize_rows(carry, u1, first, count, grid_first, grid, code, spec):
  """Rows [first, first + count) of a block with one grid whose row 0 is block row `grid_first`.

  carry = (w1, q1, d1, e1): the block's weights (updated in place), levels, dequantized rows and
  scaled errors.
  """

  def body(r, carry):
    w1, q1, d1, e1 = carry
    i = first + r
    row = w1[i]
    q, deq = _quantize_row(row, i - grid_first, grid, code, spec)
    err = (row - deq) / u1[i, i]
    later = (jnp.arange(w1.shape[0]) > i)[:, None]
    w1 = w1 - jnp.where(later, u1[i][:, None] * err[None, :], 0.0)
    return w1, q1.at[i].set(q), d1.at[i].set(deq), e1.at[i].set(err)

  return jax.lax.fori_loop(0, count, body, carry)


def _grouped_block(carry, u1, code, spec: QuantSpec):
  """A block of whole groups: each group's grid from its rows as updated so far, then its rows."""
  group = spec.group_size
  n_groups = carry[0].shape[0] // group

  def body(g, state):
    carry, scales, zeros = state
    grid = _group_grid(jax.lax.dynamic_slice_in_dim(carry[0], g * group, group), code, spec)
    carry = _quantize_rows(carry, u1, g * group, group, g * group, grid, code, spec)
    return carry, scales.at[g].set(grid.scale), zeros.at[g].set(grid.zero)

  n_out = carry[0].shape[1]
  empty = jnp.zeros((n_groups, n_out), carry[0].dtype)
  return jax.lax.fori_loop(0, n_groups, body, (carry, empty, empty))


def _gptq_one(w, u, code, spec: QuantSpec, block: int):
  """GPTQ of one expert: (q, scale, zero, w_hat, scaled errors e [in, out])."""
  n_in = w.shape[0]
  grouped = spec.granularity == "group"
  whole = None if grouped else _group_grid(w, code, spec)
  q_rows, d_rows, e_rows, scales, zeros = [], [], [], [], []
  for b0 in range(0, n_in, block):
    b1 = min(b0 + block, n_in)
    w1, u1 = w[b0:b1], u[b0:b1, b0:b1]
    carry = (w1, jnp.zeros_like(w1), jnp.zeros_like(w1), jnp.zeros_like(w1))
    if grouped:
      carry, block_scales, block_zeros = _grouped_block(carry, u1, code, spec)
      scales.append(block_scales)
      zeros.append(block_zeros)
    else:
      carry = _quantize_rows(carry, u1, 0, b1 - b0, -b0, whole, code, spec)
    _, q1, d1, e1 = carry
    q_rows.append(q1)
    d_rows.append(d1)
    e_rows.append(e1)
    if b1 < n_in:
      w = w.at[b1:].add(-(u[b0:b1, b1:].T @ e1))
  if not grouped:
    scales, zeros = [whole.scale[None]], [whole.zero[None]]
  n_cols = 1 if spec.granularity == "tensor" else w.shape[1]
  scale = jnp.concatenate(scales)[:, :n_cols]
  is_ternary = code == formats.TERNARY
  zero = jnp.where(is_ternary, 0.0, jnp.concatenate(zeros)[:, :n_cols])
  return (jnp.concatenate(q_rows), scale, zero, jnp.concatenate(d_rows),
          jnp.concatenate(e_rows))


def _block_size(block_size: int, n_in: int, spec: QuantSpec) -> int:
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1 (e.g. {DEFAULT_BLOCK})")
  block = min(block_size, n_in)
  if spec.granularity == "group":
    # Whole groups per block, so a group's grid sees its rows fully updated.
    block = max(spec.group_size, block // spec.group_size * spec.group_size)
  return block


def gptq(w, u, codes, spec: QuantSpec, *, dead=None, h=None,
         block_size: int = DEFAULT_BLOCK) -> GptqResult:
  """GPTQ of expert weights at per-expert codes, vectorised over the leading (expert) dim.

  Args:
    w: weights [E, in, out] (float).
    u: [E, in, in] upper Cholesky factors of the damped inverse Hessians (`inverse_hessian_factor`).
    codes: [E] int bit codes (may be traced): 0 passes the weight through, 1 ternary, 2/3/4/8 intN.
    spec: the quantization spec (granularity, group size, symmetric, ternary method, scale bytes,
      scale_init: "mse" searches each group's scale and keeps it per column where it lowers the
      output error).
    dead: optional [E, in] bool: inputs that never fired (their weights are set to zero).
    h: optional [E, in, in] Hessians that score the MSE grid against the absmax grid per column
      (scale_init="mse"); None scores with the damped Hessian that `u` factors.
    block_size: rows per lazy-batch block (rounded to whole groups for granularity "group").

  Returns:
    GptqResult with q [E, in, out], scale and zero_point [E, n_in_groups, n_cols], w_hat [E, in, out],
    searched [E, n_cols].
  """
  w = jnp.asarray(w, jnp.float32)
  gran.grouped_shape(w.shape, spec)  # a group size that does not divide `in` is a one-line error
  if w.ndim != 3 or u.shape != (w.shape[0], w.shape[1], w.shape[1]):
    raise ValueError(f"gptq needs w [E, in, out] and u [E, in, in]; got {w.shape} and {u.shape}")
  if h is not None and np.shape(h) != u.shape:
    raise ValueError(f"gptq needs h of the shape of u {u.shape}; got {np.shape(h)}")
  codes = jnp.broadcast_to(jnp.asarray(codes, jnp.int32), w.shape[:1])
  if dead is None:
    dead = jnp.zeros(w.shape[:2], bool)
  h = None if h is None else jnp.asarray(h, jnp.float32)
  return _gptq_jit(w, jnp.asarray(u, jnp.float32), jnp.asarray(dead), codes, h, spec,
                   _block_size(block_size, w.shape[1], spec))


def _column_error(w, res, h, spec):
  """[E, n_cols] output error per column (summed per tensor): delta^T H delta, or e^T e."""
  if h is None:
    err = jnp.sum(jnp.square(res[4]), axis=-2)
  else:
    delta = w - res[3]
    err = jnp.einsum("eio,eij,ejo->eo", delta, h, delta)
  return err.sum(axis=-1, keepdims=True) if spec.granularity == "tensor" else err


@functools.partial(jax.jit, static_argnums=(5, 6))
def _gptq_jit(w, u, dead, codes, h, spec, block):
  # Inputs that never fire carry no information; zero them (as the reference code does) before
  # the grid is taken so that no scale is set by a weight the calibration cannot see.
  w = jnp.where(dead[..., None], 0.0, w)

  def run(run_spec):
    return jax.vmap(functools.partial(_gptq_one, spec=run_spec, block=block))(w, u, codes)

  res = run(dataclasses.replace(spec, scale_init="absmax"))
  n_cols = res[1].shape[-1]
  searched = jnp.zeros(w.shape[:1] + (n_cols,), bool)
  if spec.scale_init == "mse":
    found = run(spec)
    searched = _column_error(w, found, h, spec) < _column_error(w, res, h, spec)
    res = tuple(jnp.where(searched[:, None, :], a, b) for a, b in zip(found, res))
  q, scale, zero, w_hat, _ = res
  # A group whose levels all dequantize to 0 is a zero weight: scale 0 is what re-derives from it.
  q_g = gran.to_groups(q, spec)
  empty = gran.stats_to_scales(gran.reduce_groups(
      (q_g != gran.scales_to_stats(zero, q.shape, spec)).astype(q.dtype), jnp.sum)) == 0
  empty = empty & (codes != formats.FP)[:, None, None]
  q = gran.from_groups(jnp.where(gran.scales_to_stats(empty, q.shape, spec), 0.0, q_g), q.shape)
  scale, zero = jnp.where(empty, 0.0, scale), jnp.where(empty, 0.0, zero)
  return GptqResult(q, scale, zero, w_hat, searched)


def _inverse_factor(h, damp: float):
  """Upper Cholesky factor of the damped H^-1 in float64 (numpy), or None if H + damp is not PD."""
  h = np.array(h, np.float64)
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  h += damp * np.mean(np.diag(h)) * np.eye(len(h))
  try:
    l_inv = np.linalg.inv(np.linalg.cholesky(h))  # H^-1 = L^-T L^-1
    u = np.linalg.cholesky(l_inv.T @ l_inv).T
  except np.linalg.LinAlgError:
    return None
  return (u, dead) if np.all(np.isfinite(u)) else None


def inverse_hessian_factor(h, damp: float = DEFAULT_DAMP, max_tries: int = 6):
  """Upper Cholesky factors of (H + damp * mean(diag H) * I)^-1 per expert, damping more on failure.

  Host-side float64 (numpy): the factors are small ([in, in] per expert) and float64 keeps
  ill-conditioned Hessians usable. Dead inputs (diag H == 0) get H_ii = 1 first, as in the
  reference code. An expert whose H + damping is not positive definite (singular or ill-conditioned)
  is retried with 10x the damping (DEFAULT_DAMP after a damping of 0), up to `max_tries` times;
  after that its factor is the identity, so GPTQ reduces to round-to-nearest for it.

  Args:
    h: [E, in, in] Hessians (any positive scale; 2 X^T X / n).
    damp: the relative damping lambda.
    max_tries: damping attempts per expert (lambda, 10 lambda, ...).

  Returns:
    (u [E, in, in] float32, dead [E, in] bool, damp_used [E]: the lambda each expert needed, inf
    where every attempt failed), all numpy.
  """
  h = np.asarray(h)
  e, n = h.shape[0], h.shape[-1]
  u = np.broadcast_to(np.eye(n, dtype=np.float32), (e, n, n)).copy()
  dead = np.zeros((e, n), bool)
  damp_used = np.full(e, np.inf)
  for i in range(e):
    lam = float(damp)
    for _ in range(max_tries):
      found = _inverse_factor(h[i], lam)
      if found is not None:
        u[i], dead[i], damp_used[i] = found[0], found[1], lam
        break
      lam = lam * 10 if lam > 0 else DEFAULT_DAMP
  return u, dead, damp_used


def exact_latent(result: GptqResult, codes, spec: QuantSpec):
  """Float weights whose round-to-nearest quantization (quantize_dequantize) is exactly `w_hat`.

  Symmetric intN: `w_hat` itself, quantized at the ratio `exact_ratio` gives. Asymmetric intN, TWN
  ternary and any ternary under scale_init="mse": `w_hat` itself (its re-derived grid is the GPTQ
  grid, see the module comment). Absmean ternary re-derives its scale as mean|w|, which `w_hat`
  (zeros included) does not have; each group's nonzero levels are scaled by n / k (n weights, k
  nonzero) so that the mean is the GPTQ scale and they still round to +-1. Full-precision codes
  pass through.

  Args:
    result: a GptqResult for weights [E, in, out].
    codes: the [E] codes it was computed at.
    spec: its spec.

  Returns:
    [E, in, out] float32 weights.
  """
  w_hat = jnp.asarray(result.w_hat)
  if spec.ternary_method != "absmean" or spec.scale_init == "mse":
    return w_hat
  q_g = gran.to_groups(jnp.asarray(result.q), spec)
  nonzero = gran.reduce_groups((q_g != 0).astype(jnp.float32), jnp.sum)
  stretch = q_g.shape[-2] / jnp.maximum(nonzero, 1.0)
  s_g = gran.scales_to_stats(jnp.asarray(result.scale), w_hat.shape, spec)
  stretched = gran.from_groups(q_g * stretch * s_g, w_hat.shape)
  is_ternary = (jnp.broadcast_to(jnp.asarray(codes), w_hat.shape[:1]) == formats.TERNARY)
  return jnp.where(is_ternary[:, None, None], stretched, w_hat)


def exact_ratio(result: GptqResult, codes, spec: QuantSpec) -> np.ndarray:
  """The stored ratio per group (quant.stored_ratio) under which `exact_latent` quantizes to GPTQ's.

  The fake quantizer's symmetric intN scale is storable(ratio * max|w| / qmax); on the latent
  `w_hat` (max|w_hat| = max|q| * s) the ratio qmax * s / max|w_hat| gives back GPTQ's scale s: below
  1 where a group used the level -qmax-1, above 1 where its levels stayed under qmax. The float32
  ratio is stepped by ulps until the fake quantizer's float32 arithmetic gives s exactly (fp32
  scales need it; fp16 rounding absorbs it). 1 for asymmetric, ternary and full-precision groups.

  Args:
    result: a GptqResult for weights [E, in, out].
    codes: the [E] codes it was computed at (host values).
    spec: its spec.

  Returns:
    [E, n_in_groups, n_cols] float32 numpy ratios (scale_shape).
  """
  scale = np.asarray(result.scale, np.float32)
  ones = np.ones_like(scale)
  if not spec.symmetric:
    return ones
  codes = np.broadcast_to(np.asarray(codes), scale.shape[:1])
  bits = np.where(codes >= 2, codes, 8)
  qmax = (np.float32(2.0) ** (bits - 1) - 1).astype(np.float32)[:, None, None]
  w_hat = np.asarray(result.w_hat, np.float32)
  absmax = gran.stats_to_scales(gran.reduce_groups(np.abs(gran.to_groups(w_hat, spec)), np.max))
  base = (absmax / qmax).astype(np.float32)  # the fake quantizer's base scale, in float32
  use = (codes >= 2)[:, None, None] & (absmax > 0)
  safe = np.where(use, base, np.float32(1))
  ratio = np.where(use, scale / safe, ones).astype(np.float32)

  codes_j = jnp.asarray(codes, jnp.int32)

  def rederived(r):  # the fake quantizer's own (jitted) scales at ratio r
    return np.asarray(gran.stats_to_scales(_int_form(jnp.asarray(w_hat), codes_j, jnp.asarray(r),
                                                     spec)[1]))

  # Candidates within 2 ulps of qmax * s / max|w_hat|; each group keeps the first that is closest.
  up, down = np.nextafter(ratio, np.float32(np.inf)), np.nextafter(ratio, np.float32(-np.inf))
  tries = [ratio, up, down, np.nextafter(up, np.float32(np.inf)),
           np.nextafter(down, np.float32(-np.inf))]
  miss = np.stack([np.abs(rederived(r) - scale) for r in tries])
  ratio = np.take_along_axis(np.stack(tries), np.argmin(miss, axis=0)[None], axis=0)[0]
  ratio = np.where(use, ratio, ones).astype(np.float32)
  return ratio
