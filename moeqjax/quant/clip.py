"""Learned scale ratios (clip ratios, LSQ scales): the one definition of the effective ratio and its range."""

# A learned clip ratio r multiplies an intN scale: r = 1 keeps absmax, smaller r clips outliers. The
# trained parameter (the raw ratio) is kept in [CLIP_MIN, CLIP_MAX] by projection after every optimizer
# update (moeqjax.train.optim.project_params), not by a hard clamp in the forward pass, whose zero
# gradient outside the range would freeze a ratio that once stepped past a bound. The forward pass,
# export and memory/allocation code still read the raw value through effective_clip_ratio, so a raw value
# outside the range (an old checkpoint, a hand-edited tree) means the same thing everywhere.
# With `learn_scale` the same params are LSQ scale ratios for ternary and intN groups; a ternary ratio
# multiplies mean|W|, and its MSE-optimal value is above 1, so that range reaches SCALE_MAX.
# With `stored_ratio` the params hold GPTQ's intN ratios, fixed: qmax / max|q| of each group (below 1
# where GPTQ used the level -qmax-1), up to qmax where its levels stayed small, so that range reaches
# STORED_MAX.

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MIN = 0.05  # keeps a scale away from zero
CLIP_MAX = 1.0  # a ratio above 1 would widen the grid past the absmax and waste levels
SCALE_MAX = 4.0  # learn_scale: room above the ternary MSE ratios (about 1.2 to 2) and intN absmax
STORED_MAX = 128.0  # stored_ratio: GPTQ's qmax / max|q| is at most 127 (int8, max|q| = 1)
CLIP_SUFFIX = "_clip"  # a weight "w_in" has its ratios in the param "w_in_clip"


def is_clip_param(name: str) -> bool:
  """Whether a param name holds learned clip ratios (e.g. "w_in_clip")."""
  return name.endswith(CLIP_SUFFIX)


def ratio_max(spec=None) -> float:
  """The upper bound of a ratio: CLIP_MAX for clip ratios, SCALE_MAX under `learn_scale`, STORED_MAX
  under `stored_ratio`."""
  if spec is not None and spec.learn_scale:
    return SCALE_MAX
  return STORED_MAX if spec is not None and spec.stored_ratio else CLIP_MAX


@jax.custom_jvp
def _clamp_ste(raw, upper):
  return jnp.clip(raw, CLIP_MIN, upper)


@_clamp_ste.defjvp
def _clamp_ste_jvp(primals, tangents):
  # Identity tangent: at a bound (where projection leaves a ratio) the ratio still learns.
  return _clamp_ste(*primals), tangents[0]


def effective_clip_ratio(raw: jax.Array | np.ndarray, spec=None) -> jax.Array | np.ndarray:
  """The ratio that quantization uses for a raw learned ratio: clamped to [CLIP_MIN, ratio_max(spec)].

  Args:
    raw: raw ratios of any shape, e.g. [E, 1, F]; numpy (export, packing) or jax (the model).
    spec: the QuantSpec (its `learn_scale` widens the range); None means a clip ratio.

  Returns:
    The clamped ratios, same shape, dtype and array type as `raw`. For jax input the gradient with
    respect to `raw` is the identity (straight-through), so the clamp never stops a ratio learning.
  """
  upper = ratio_max(spec)
  if isinstance(raw, jax.Array):
    return _clamp_ste(raw, jnp.asarray(upper, raw.dtype))
  raw = np.asarray(raw)
  return np.clip(raw, CLIP_MIN, upper).astype(raw.dtype)


def learned_ratio(params, weight_path, spec) -> np.ndarray | None:
  """The effective learned ratio of the weight at `weight_path` (keys into nested param dicts).

  The one reader for packing, export, allocation and tests: None when `spec` carries no ratio
  (learned or stored) or `params` holds none for this weight (e.g. a teacher), else the numpy
  float32 effective ratio.
  """
  if not spec.has_ratio:
    return None
  node = params
  for key in (*weight_path[:-1], weight_path[-1] + CLIP_SUFFIX):
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return effective_clip_ratio(np.asarray(jax.device_get(node), np.float32), spec)


def project_clip_ratio(raw: jax.Array, upper: float = CLIP_MAX) -> jax.Array:
  """Projects raw ratios onto [CLIP_MIN, upper] (after an optimizer update; no gradient use)."""
  return jnp.clip(raw, CLIP_MIN, upper)
