"""Expert capacity (off by default): which (token, k) pairs an expert accepts, in token order."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def expert_capacity(num_pairs: int, num_experts: int, capacity_factor: float) -> int:
  """ceil(capacity_factor * T*k / E): the most pairs one expert accepts from the T*k of a call."""
  return math.ceil(capacity_factor * num_pairs / num_experts)


def capacity_keep(idx_TxK: jax.Array, num_experts: int, capacity_factor: float) -> jax.Array:
  """bool [T, K]: True for the (token, k) pairs their expert accepts.

  The capacity is global: every expert accepts at most expert_capacity(T*k, E, C) pairs of all
  T tokens of the call (the whole global batch on a mesh, however it is split over devices), the
  first ones in token order (token t before t + 1; a token's k experts differ, so the slot never
  decides). The rest overflow and are dropped, as in GShard / Switch / MaxText. It depends only on
  the routing, so every dispatch and every mesh drops the same pairs.
  """
  t, k = idx_TxK.shape
  cap = expert_capacity(t * k, num_experts, capacity_factor)
  flat_M = idx_TxK.reshape(-1)
  # A stable sort keeps token order within each expert's group: rank = place in that queue.
  order_M = jnp.argsort(flat_M, stable=True)
  counts_E = jnp.bincount(flat_M, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted_M = jnp.arange(t * k) - starts_E[flat_M[order_M]]
  rank_M = jnp.zeros_like(rank_sorted_M).at[order_M].set(rank_sorted_M)
  return (rank_M < cap).reshape(t, k)
