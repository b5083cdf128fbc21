"""The effective clipping ratio of a learned clip parameter, the one place that says what it is."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

CLIP_MIN, CLIP_MAX = 0.05, 1.0


def effective_clip_ratio(raw):
  """The clip ratio the student uses for a raw `*_clip` param (numpy in, numpy out; else jax)."""
  if isinstance(raw, np.ndarray):
    return np.clip(raw, CLIP_MIN, CLIP_MAX)
  return jnp.clip(raw, CLIP_MIN, CLIP_MAX)
