"""Per-expert router statistics accumulated inside the jitted train step (no extra pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

GRAD_EMA_DECAY = 0.99  # EMA of router-gradient row norms; ~100-step horizon


def router_kernels(params, num_layers: int) -> jax.Array:
  """Router weights stacked over layers, [L, D, E] (column s is expert s's router vector w_s)."""
  return jnp.stack([params[f"layers_{i}"]["moe"]["router"]["kernel"] for i in range(num_layers)])


def router_row_norms(params, num_layers: int) -> jax.Array:
  """||w_s||_2 for every layer and expert, [L, E]."""
  return jnp.linalg.norm(router_kernels(params, num_layers).astype(jnp.float32), axis=1)


def init_router_stats(params, num_layers: int) -> dict:
  """Zeroed accumulators, plus the router norms at the start of this run, ||w_s(0)||."""
  start = router_row_norms(params, num_layers)
  zeros = lambda: jnp.zeros_like(start)  # distinct buffers: the state is donated
  return {
      "router_norm_start": start,  # [L, E]
      "grad_norm_sum": zeros(),  # sum over steps of ||dL/dw_s||_2
      "grad_norm_ema": zeros(),  # bias-uncorrected EMA of the same
      "count": zeros(),  # top-k assignments of each expert (student routing)
      "gate_sum": zeros(),  # sum of gate weights given to each expert
      "steps": jnp.zeros((), jnp.int32),
  }


def update_router_stats(stats: dict, grads, idx_LxTxK: jax.Array, gates_LxTxK: jax.Array,
                        num_layers: int) -> dict:
  """Adds one step's router-gradient norms and routing counts to the accumulators."""
  grad_norm = router_row_norms(grads, num_layers)
  num_experts = grad_norm.shape[-1]
  onehot = jax.nn.one_hot(idx_LxTxK, num_experts, dtype=jnp.float32)  # [L, T, K, E]
  return {
      "router_norm_start": stats["router_norm_start"],
      "grad_norm_sum": stats["grad_norm_sum"] + grad_norm,
      "grad_norm_ema": GRAD_EMA_DECAY * stats["grad_norm_ema"] + (1 - GRAD_EMA_DECAY) * grad_norm,
      "count": stats["count"] + jnp.sum(onehot, axis=(1, 2)),
      "gate_sum": stats["gate_sum"] + jnp.einsum("ltke,ltk->le", onehot,
                                                 gates_LxTxK.astype(jnp.float32)),
      "steps": stats["steps"] + 1,
  }
