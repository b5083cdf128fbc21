"""Per-expert router statistics accumulated inside the jitted train step (no extra pass)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moeqjax.model.moe_paths import at_path, moe_paths

GRAD_EMA_DECAY = 0.99  # EMA of router-gradient row norms; ~100-step horizon


def router_kernels(params, num_layers: int | None = None) -> jax.Array:
  """Router weights stacked over MoE layers, [L, D, E] (column s is expert s's router vector w_s).

  The layers are the tree's MoE blocks in model.moe_paths order (a Switch model: its encoder's
  sparse layers, then its decoder's); num_layers, when given, is checked against their count.
  """
  paths = moe_paths(params, "router")
  if num_layers is not None and len(paths) != num_layers:
    raise ValueError(f"the params hold {len(paths)} MoE routers, not {num_layers}")
  return jnp.stack([at_path(params, p)["router"]["kernel"] for p in paths])


def router_row_norms(params, num_layers: int | None = None) -> jax.Array:
  """||w_s||_2 for every layer and expert, [L, E]."""
  return jnp.linalg.norm(router_kernels(params, num_layers).astype(jnp.float32), axis=1)


def init_router_stats(params, num_layers: int | None = None) -> dict:
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


def _routing_sums(idx_LxTxK, gates_LxTxK, num_experts: int, token_mask_T=None):
  onehot = jax.nn.one_hot(idx_LxTxK, num_experts, dtype=jnp.float32)  # [L, T, K, E]
  if token_mask_T is not None:  # padding counts toward no expert
    onehot = onehot * token_mask_T.astype(jnp.float32)[None, :, None, None]
  return (jnp.sum(onehot, axis=(1, 2)),
          jnp.einsum("ltke,ltk->le", onehot, gates_LxTxK.astype(jnp.float32)))


def update_router_stats(stats: dict, grads, idx_LxTxK, gates_LxTxK,
                        num_layers: int | None = None, token_masks=None) -> dict:
  """Adds one step's router-gradient norms and routing counts to the accumulators.

  Args:
    stats: the accumulators (init_router_stats).
    grads: the gradients of the params (the routers' give the gradient norms).
    idx_LxTxK, gates_LxTxK: the student's routing stacked over MoE layers; or, for a model whose
      stacks route different token counts (a Switch encoder and decoder), a tuple of one such
      array per stack, in model.moe_paths order (encoder first).
    num_layers: the MoE layers expected (checked), or None.
    token_masks: None (every routed token counts), or one bool [T] per stack (the routing's
      token order), False where a token is padding and counts toward no expert.
  """
  grad_norm = router_row_norms(grads, num_layers)
  num_experts = grad_norm.shape[-1]
  if not isinstance(idx_LxTxK, (tuple, list)):
    idx_LxTxK, gates_LxTxK = (idx_LxTxK,), (gates_LxTxK,)
  masks = token_masks if token_masks is not None else (None,) * len(idx_LxTxK)
  sums = [_routing_sums(i, g, num_experts, m) for i, g, m in zip(idx_LxTxK, gates_LxTxK, masks)]
  count = jnp.concatenate([c for c, _ in sums])
  gate_sum = jnp.concatenate([g for _, g in sums])
  return {
      "router_norm_start": stats["router_norm_start"],
      "grad_norm_sum": stats["grad_norm_sum"] + grad_norm,
      "grad_norm_ema": GRAD_EMA_DECAY * stats["grad_norm_ema"] + (1 - GRAD_EMA_DECAY) * grad_norm,
      "count": stats["count"] + count,
      "gate_sum": stats["gate_sum"] + gate_sum,
      "steps": stats["steps"] + 1,
  }
