"""Expert computation: dropless grouped matmul (ragged_dot) and the dense masked oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(h_gate, h_in):
  return jax.nn.silu(h_gate) * h_in


def dense_experts(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK):
  """Every expert on every token, combined with zero weight for unselected experts.

  E/k times the FLOPs of the grouped path; kept as the test oracle and for tiny E.
  """
  num_experts = w_in_ExDxF.shape[0]
  h = swiglu(jnp.einsum("td,edf->tef", x_TxD, w_gate_ExDxF),
             jnp.einsum("td,edf->tef", x_TxD, w_in_ExDxF))
  y_TxExD = jnp.einsum("tef,efd->ted", h, w_out_ExFxD)
  combine_TxE = jnp.sum(
      jax.nn.one_hot(idx_TxK, num_experts, dtype=y_TxExD.dtype) * gates_TxK[..., None].astype(
          y_TxExD.dtype), axis=1)
  return jnp.einsum("ted,te->td", y_TxExD, combine_TxE)


def ragged_experts(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK):
  """Dropless MoE: sort the T*k (token, expert) pairs by expert and run one grouped matmul.

  No capacity factor and no token dropping: group sizes are the exact per-expert counts.
  """
  t, k = idx_TxK.shape
  num_experts = w_in_ExDxF.shape[0]
  flat_expert_M = idx_TxK.reshape(-1)
  order_M = jnp.argsort(flat_expert_M, stable=True)
  token_M = order_M // k
  x_MxD = jnp.take(x_TxD, token_M, axis=0)
  group_sizes_E = jnp.bincount(flat_expert_M, length=num_experts).astype(jnp.int32)
  h = swiglu(jax.lax.ragged_dot(x_MxD, w_gate_ExDxF, group_sizes_E),
             jax.lax.ragged_dot(x_MxD, w_in_ExDxF, group_sizes_E))
  y_MxD = jax.lax.ragged_dot(h, w_out_ExFxD, group_sizes_E)
  inverse_M = jnp.argsort(order_M)
  y_TxKxD = jnp.take(y_MxD, inverse_M, axis=0).reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))


def gathered_experts(x_TxD, w_in_MxDxF, w_gate_MxDxF, w_out_MxFxD, gates_TxK):
  """Each (token, slot) pair with its own gathered expert weights, M = T*k pairs in token order.

  The decode path of packed serving: with fewer pairs than experts, reading only the selected
  experts' weights moves fewer bytes than any grouped matmul over all experts.
  """
  t, k = gates_TxK.shape
  x_MxD = jnp.repeat(x_TxD, k, axis=0)
  h = swiglu(jnp.einsum("md,mdf->mf", x_MxD, w_gate_MxDxF),
             jnp.einsum("md,mdf->mf", x_MxD, w_in_MxDxF))
  y_TxKxD = jnp.einsum("mf,mfd->md", h, w_out_MxFxD).reshape(t, k, -1)
  return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))


DISPATCH = {"ragged": ragged_experts, "dense": dense_experts}
