"""Learned clip ratios: the one definition of the effective ratio, and the projection that keeps it in range."""

# A learned clip ratio r multiplies an intN scale: r = 1 keeps absmax, smaller r clips outliers. The
# trained parameter (the raw ratio) is kept in [CLIP_MIN, CLIP_MAX] by projection after every optimizer
# update (moeqjax.train.optim.project_params), not by a hard clamp in the forward pass, whose zero
# gradient outside the range would freeze a ratio that once stepped past a bound. The forward pass,
# export and memory/allocation code still read the raw value through effective_clip_ratio, so a raw value
# outside the range (an old checkpoint, a hand-edited tree) means the same thing everywhere.

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MIN = 0.05  # keeps a scale away from zero
CLIP_MAX = 1.0  # a ratio above 1 would widen the grid past the absmax and waste levels
CLIP_SUFFIX = "_clip"  # a weight "w_in" has its ratios in the param "w_in_clip"


def is_clip_param(name: str) -> bool:
  """Whether a param name holds learned clip ratios (e.g. "w_in_clip")."""
  return name.endswith(CLIP_SUFFIX)


@jax.custom_jvp
def _clamp_ste(raw):
  return jnp.clip(raw, CLIP_MIN, CLIP_MAX)


@_clamp_ste.defjvp
def _clamp_ste_jvp(primals, tangents):
  # Identity tangent: at a bound (where projection leaves a ratio) the ratio still learns.
  return _clamp_ste(primals[0]), tangents[0]


def effective_clip_ratio(raw: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
  """The clip ratio that quantization uses for a raw learned ratio: clamped to [CLIP_MIN, CLIP_MAX].

  Args:
    raw: raw ratios of any shape, e.g. [E, 1, F]; numpy (export, packing) or jax (the model).

  Returns:
    The clamped ratios, same shape, dtype and array type as `raw`. For jax input the gradient with
    respect to `raw` is the identity (straight-through), so the clamp never stops a ratio learning.
  """
  if isinstance(raw, jax.Array):
    return _clamp_ste(raw)
  raw = np.asarray(raw)
  return np.clip(raw, CLIP_MIN, CLIP_MAX).astype(raw.dtype)


def project_clip_ratio(raw: jax.Array) -> jax.Array:
  """Projects raw ratios onto [CLIP_MIN, CLIP_MAX] (after an optimizer update; no gradient use)."""
  return jnp.clip(raw, CLIP_MIN, CLIP_MAX)
