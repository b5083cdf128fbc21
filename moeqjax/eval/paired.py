"""Paired differences of two variants over the same evaluation windows, with a standard error."""

from __future__ import annotations

import math

import numpy as np


def paired_difference(a_N, b_N) -> tuple[float, float | None]:
  """Mean of a - b over paired windows, and its standard error (None with fewer than 2 windows).

  Both variants score the same windows, so the window-to-window variation of the text cancels in
  a - b and the standard error measures only how consistently one variant beats the other. With
  windows of equal length the mean equals the difference of the overall means. The error treats
  windows as independent samples; neighbouring windows of one file are not quite, so read it as a
  lower bound on the noise.
  """
  d_N = np.asarray(a_N, np.float64) - np.asarray(b_N, np.float64)
  if d_N.ndim != 1 or d_N.size == 0:
    raise ValueError(f"paired_difference needs two equal-length 1-D arrays, got shape {d_N.shape}")
  se = float(np.std(d_N, ddof=1) / math.sqrt(d_N.size)) if d_N.size > 1 else None
  return float(np.mean(d_N)), se
