"""MSE-optimal scale ratios: a vectorised grid search per quantization group, for intN and ternary."""

# A ratio r multiplies a group's base scale: intN absmax / qmax (or (max - min) / levels), ternary
# mean|W|. The search runs one candidate at a time in a lax.scan, so memory stays at one weight copy,
# and every candidate is scored with the quantizer that will use it (fp16 scale rounding included),
# so the chosen ratio is the grid's best for the weight the student actually sees.
#   intN:    r over RATIO_GRID, descending from 1.0 (absmax); ties keep the larger ratio.
#   ternary: for a threshold delta = t * mean|W| (t over RATIO_GRID) the error-optimal scale of the
#            kept weights is alpha = mean(|w| : |w| > delta); the candidate ratio is alpha / mean|W|.
#            Ratio 1 (absmean) is a candidate too. The levels are round(w / s) clipped to [-1, 1]:
#            for the codebook {-s, 0, s} nearest-level rounding is the error-optimal assignment, so
#            scoring at threshold s / 2 can only improve on the (delta, alpha) pair searched.

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.quant import granularity as gran

RATIO_GRID = tuple(float(v) for v in np.arange(100, 29, -2) / 100.0)  # 1.00, 0.98, ..., 0.30


def best_ratio(w_g: jax.Array, candidates: Callable, num: int, dequant: Callable) -> jax.Array:
  """The candidate ratio with the least squared error per group.

  Args:
    w_g: grouped weight [..., ng, G, nc] (float32).
    candidates: k -> the k-th candidate ratio, broadcastable to [..., ng, 1, nc].
    num: number of candidates.
    dequant: ratio [..., ng, 1, nc] -> the dequantized grouped weight at that ratio.

  Returns:
    The best ratio per group [..., ng, 1, nc]; the first candidate wins ties.
  """
  w_g = jax.lax.stop_gradient(w_g)
  stat_shape = gran.reduce_groups(w_g, jnp.sum).shape

  def score(k):
    ratio = jnp.broadcast_to(candidates(k), stat_shape).astype(w_g.dtype)
    return ratio, gran.reduce_groups(jnp.square(dequant(ratio) - w_g), jnp.sum)

  def step(best, k):
    ratio, err = score(k)
    better = err < best[1]
    return (jnp.where(better, ratio, best[0]), jnp.where(better, err, best[1])), None

  (ratio, _), _ = jax.lax.scan(step, score(0), jnp.arange(1, num))
  return ratio


def int_ratio(w_g: jax.Array, dequant: Callable) -> jax.Array:
  """The MSE-optimal intN ratio over RATIO_GRID (1.0 first, so absmax wins ties)."""
  grid = jnp.asarray(RATIO_GRID, w_g.dtype)
  return best_ratio(w_g, lambda k: grid[k], len(RATIO_GRID), dequant)


def ternary_ratio(w_g: jax.Array, dequant: Callable) -> jax.Array:
  """The MSE-optimal ternary ratio (of mean|W|): 1.0 (absmean) and alpha(t) / mean|W| per threshold t."""
  abs_w = jnp.abs(w_g)
  mean_abs = gran.reduce_groups(abs_w, jnp.mean)
  safe_mean = jnp.where(mean_abs > 0, mean_abs, 1.0)
  grid = jnp.asarray((1.0,) + RATIO_GRID, w_g.dtype)  # index 0: absmean itself

  def candidate(k):
    kept = abs_w > grid[k] * mean_abs
    count = gran.reduce_groups(kept.astype(w_g.dtype), jnp.sum)
    alpha = gran.reduce_groups(jnp.where(kept, abs_w, 0.0), jnp.sum) / jnp.maximum(count, 1.0)
    # An all-zero group (or one that keeps nothing) falls back to ratio 1.
    return jnp.where((k == 0) | (count == 0) | (mean_abs == 0), 1.0, alpha / safe_mean)

  return best_ratio(w_g, candidate, len(grid), dequant)
