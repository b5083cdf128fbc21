"""The expert-capacity drop rule as a plain loop, and routings that overflow it."""

import math

import numpy as np


def reference_keep(idx, num_experts, factor, seq_len=None, capacity=0):
  """Per sequence of seq_len tokens (all T when None): 1st choices in token order, then 2nd
  choices, ...; an expert takes a pair while it holds fewer than `capacity` (when > 0) or
  ceil(factor*S*k/E). idx is [T, K] with T a multiple of seq_len, or [B, S, K]."""
  idx = np.asarray(idx)
  shape = idx.shape
  k = shape[-1]
  s = shape[-2] if idx.ndim == 3 else (seq_len or shape[0])
  rows = idx.reshape(-1, s, k)
  cap = capacity if capacity > 0 else math.ceil(factor * s * k / num_experts)
  keep = np.zeros(rows.shape, bool)
  for b, row in enumerate(rows):
    held = np.zeros(num_experts, int)
    for j in range(k):
      for t in range(s):
        keep[b, t, j] = held[row[t, j]] < cap
        held[row[t, j]] += keep[b, t, j]
  return keep.reshape(shape)


def skewed_idx(seed, t, e, k):
  """Top-k expert ids with a popular expert 0, so that a capacity near 1 drops pairs."""
  r = np.random.default_rng(seed)
  p = 2.0 ** -np.arange(e)
  return np.stack([r.choice(e, size=k, replace=False, p=p / p.sum()) for _ in range(t)])
