"""The expert-capacity drop rule as a plain loop, and routings that overflow it."""

import math

import numpy as np


def reference_keep(idx, num_experts, factor):
  """Pairs in token order; an expert takes a pair while it holds fewer than ceil(C*T*k/E)."""
  idx = np.asarray(idx)
  t, k = idx.shape
  cap = math.ceil(factor * t * k / num_experts)
  held = np.zeros(num_experts, int)
  keep = np.zeros((t, k), bool)
  for i in range(t):
    for j in range(k):
      keep[i, j] = held[idx[i, j]] < cap
      held[idx[i, j]] += keep[i, j]
  return keep


def skewed_idx(seed, t, e, k):
  """Top-k expert ids with a popular expert 0, so that a capacity near 1 drops pairs."""
  r = np.random.default_rng(seed)
  p = 2.0 ** -np.arange(e)
  return np.stack([r.choice(e, size=k, replace=False, p=p / p.sum()) for _ in range(t)])
