"""Expert capacity (off by default): which (token, k) pairs an expert accepts, per sequence."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def expert_capacity(seq_len: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """ceil(capacity_factor * S*k / E): the most pairs one expert accepts from one sequence."""
  return math.ceil(capacity_factor * seq_len * top_k / num_experts)


def _keep_one_sequence(idx_KxS: jax.Array, num_experts: int, cap: int) -> jax.Array:
  """bool [K, S]: pairs in priority order (slot k, then token); each expert keeps its first cap."""
  k, s = idx_KxS.shape
  flat_M = idx_KxS.reshape(-1)
  # A stable sort keeps priority order within each expert's group: rank = place in that queue.
  order_M = jnp.argsort(flat_M, stable=True)
  counts_E = jnp.bincount(flat_M, length=num_experts)
  starts_E = jnp.cumsum(counts_E) - counts_E
  rank_sorted_M = jnp.arange(k * s) - starts_E[flat_M[order_M]]
  rank_M = jnp.zeros_like(rank_sorted_M).at[order_M].set(rank_sorted_M)
  return (rank_M < cap).reshape(k, s)


def capacity_keep(idx_BxSxK: jax.Array, num_experts: int, *, capacity_factor: float = 0.0,
                  capacity: int = 0) -> jax.Array:
  """bool [B, S, K]: True for the (token, k) pairs their expert accepts.

  The capacity holds per sequence (batch row), as in GShard, Switch and MaxText: within one row an
  expert accepts at most `capacity` pairs (a fixed integer, Hugging Face Switch's expert_capacity)
  or, when capacity is 0, expert_capacity(S, K, E, capacity_factor) of them. Top-1 priority: every
  token's 1st choice is served, in token order, before any token's 2nd choice, and so on. So a
  row's drops never depend on which other rows share the call (evaluation batch size, data
  shards), and with K = 1 the rule is Switch's (earlier tokens first).

  A 2nd choice ranks behind the 1st choices of later tokens, so with K > 1 a token's drop can
  depend on tokens after it; decoding one token per step (S = 1) never overflows, since a token's
  K experts differ and every capacity is at least 1.
  """
  b, s, k = idx_BxSxK.shape
  cap = capacity if capacity > 0 else expert_capacity(s, k, num_experts, capacity_factor)
  keep_BxKxS = jax.vmap(lambda i: _keep_one_sequence(i, num_experts, cap))(
      jnp.swapaxes(idx_BxSxK, 1, 2))
  return jnp.swapaxes(keep_BxKxS, 1, 2)


def real_token_drop_rate(idx_LxMxK: jax.Array, token_mask_BxS: jax.Array, num_experts: int, *,
                         capacity_factor: float = 0.0, capacity: int = 0) -> jax.Array:
  """[L]: the share of real tokens' (token, k) pairs that the capacity drops, per layer.

  The keep rule is capacity_keep on the routing the MoE block returned (M = B*S tokens, row by
  row), so it is the forward's own; only the count leaves out the tokens where token_mask_BxS
  is False (padding), which the forward routes as transformers does.
  """
  b, s = token_mask_BxS.shape
  num_layers, _, k = idx_LxMxK.shape
  if num_layers == 0:
    return jnp.zeros((0,), jnp.float32)
  keep_LxMxK = jax.vmap(lambda i: capacity_keep(
      i.reshape(b, s, k), num_experts, capacity_factor=capacity_factor,
      capacity=capacity).reshape(b * s, k))(idx_LxMxK)
  w_M = token_mask_BxS.reshape(-1).astype(jnp.float32)
  kept_L = jnp.einsum("lmk,m->l", keep_LxMxK.astype(jnp.float32), w_M)
  return 1.0 - kept_L / (k * jnp.maximum(jnp.sum(w_M), 1.0))
