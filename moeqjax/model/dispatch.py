"""Expert computation: dropless grouped matmul (ragged_dot) and the dense masked oracle."""

# Both paths take an optional second input: with W*A8 activation quantization, experts whose
# act_quant_E flag is set read the int8 fake-quantized x_q_TxD and the others (full-precision experts)
# read x_TxD. The choice is made per expert by selection, never by arithmetic, so it is exact.
#
# Experts are SwiGLU (w_in, w_gate, w_out) or, with w_gate None, ReLU (w_in, w_out; Switch and T5,
# model.expert_act = "relu"): every path computes the hidden state through expert_hidden.
#
# All paths take an optional keep_TxK (model.capacity.capacity_keep, with model.capacity_factor
# > 0): a pair whose keep is False contributes nothing, and the grouped paths do not compute it.

from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu(h_gate, h_in):
  return jax.nn.silu(h_gate) * h_in


def expert_hidden(project, w_in, w_gate):
  """An expert's hidden state: SwiGLU with a gate projection, ReLU without one (w_gate None).

  Args:
    project: w -> the input projected by w (an einsum or a grouped matmul over the experts).
    w_in, w_gate: the input and gate projections; w_gate is None for ReLU experts.
  """
  if w_gate is None:
    return jax.nn.relu(project(w_in))
  return swiglu(project(w_gate), project(w_in))


def _check_alt_input(x_q_TxD, act_quant_E):
  if (x_q_TxD is None) != (act_quant_E is None):
    raise ValueError("pass x_q_TxD and act_quant_E together (the quantized input and which experts "
                     "read it), or neither")


def combine(y_TxKxD, gates_TxK, keep_TxK=None):
  """sum_k gate * expert output per token; dropped pairs (keep False) count as zero rows."""
  if keep_TxK is not None:
    # A selection, not a product: a dropped row may never have been computed.
    y_TxKxD = jnp.where(keep_TxK[..., None], y_TxKxD, 0)
  return jnp.einsum("tkd,tk->td", y_TxKxD, gates_TxK.astype(y_TxKxD.dtype))


def dense_experts(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK, *,
                  x_q_TxD=None, act_quant_E=None, keep_TxK=None):
  """Every expert on every token, combined with zero weight for unselected experts.

  E/k times the FLOPs of the grouped path; kept as the test oracle and for tiny E.

  Args:
    x_TxD: token inputs.
    w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD: expert weights (w_gate_ExDxF None: ReLU experts).
    gates_TxK, idx_TxK: gate weights and expert ids of the top-k routing.
    x_q_TxD: optional second input (the activation-quantized x), read by the experts in act_quant_E.
    act_quant_E: optional bool [E]: True where an expert reads x_q_TxD instead of x_TxD.
    keep_TxK: optional bool: False for the pairs an expert's capacity dropped.

  Returns:
    [T, D] combined expert outputs.
  """
  _check_alt_input(x_q_TxD, act_quant_E)
  num_experts = w_in_ExDxF.shape[0]

  def hidden(x):
    return expert_hidden(lambda w: jnp.einsum("td,edf->tef", x, w), w_in_ExDxF, w_gate_ExDxF)

  h = hidden(x_TxD)
  if x_q_TxD is not None:
    # Twice the (oracle's) FLOPs, but each expert's hidden state is computed exactly as it would
    # be with a single input, which a per-expert stacked input would not guarantee.
    h = jnp.where(act_quant_E[None, :, None], hidden(x_q_TxD), h)
  y_TxExD = jnp.einsum("tef,efd->ted", h, w_out_ExFxD)
  if keep_TxK is not None:
    gates_TxK = jnp.where(keep_TxK, gates_TxK, 0)
  combine_TxE = jnp.sum(
      jax.nn.one_hot(idx_TxK, num_experts, dtype=y_TxExD.dtype) * gates_TxK[..., None].astype(
          y_TxExD.dtype), axis=1)
  return jnp.einsum("ted,te->td", y_TxExD, combine_TxE)


def ragged_experts(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK, *,
                   x_q_TxD=None, act_quant_E=None, keep_TxK=None):
  """Dropless MoE: sort the T*k (token, expert) pairs by expert and run one grouped matmul.

  Without keep_TxK nothing is dropped: group sizes are the exact per-expert counts. Arguments and
  result as in dense_experts.
  """
  _check_alt_input(x_q_TxD, act_quant_E)
  t, k = idx_TxK.shape
  num_experts = w_in_ExDxF.shape[0]
  flat_expert_M = idx_TxK.reshape(-1)
  if keep_TxK is not None:
    # Dropped pairs get the id E: they sort after every group and no group counts them.
    flat_expert_M = jnp.where(keep_TxK.reshape(-1), flat_expert_M, num_experts)
  order_M = jnp.argsort(flat_expert_M, stable=True)
  token_M = order_M // k
  x_MxD = jnp.take(x_TxD, token_M, axis=0)
  if x_q_TxD is not None:
    # Row m belongs to expert flat_expert_M[order_M[m]]; it reads x_q when that expert quantizes.
    reads_q_M = act_quant_E[jnp.minimum(jnp.take(flat_expert_M, order_M), num_experts - 1)]
    x_MxD = jnp.where(reads_q_M[:, None], jnp.take(x_q_TxD, token_M, axis=0), x_MxD)
  group_sizes_E = jnp.bincount(flat_expert_M, length=num_experts).astype(jnp.int32)
  h = expert_hidden(lambda w: jax.lax.ragged_dot(x_MxD, w, group_sizes_E), w_in_ExDxF,
                    w_gate_ExDxF)
  y_MxD = jax.lax.ragged_dot(h, w_out_ExFxD, group_sizes_E)
  inverse_M = jnp.argsort(order_M)
  y_TxKxD = jnp.take(y_MxD, inverse_M, axis=0).reshape(t, k, -1)
  return combine(y_TxKxD, gates_TxK, keep_TxK)


def gathered_experts(x_TxD, w_in_MxDxF, w_gate_MxDxF, w_out_MxFxD, gates_TxK, keep_TxK=None):
  """Each (token, slot) pair with its own gathered expert weights, M = T*k pairs in token order.

  The decode path of packed serving: with fewer pairs than experts, reading only the selected
  experts' weights moves fewer bytes than any grouped matmul over all experts.
  """
  t, k = gates_TxK.shape
  x_MxD = jnp.repeat(x_TxD, k, axis=0)
  h = expert_hidden(lambda w: jnp.einsum("md,mdf->mf", x_MxD, w), w_in_MxDxF, w_gate_MxDxF)
  y_TxKxD = jnp.einsum("mf,mfd->md", h, w_out_MxFxD).reshape(t, k, -1)
  return combine(y_TxKxD, gates_TxK, keep_TxK)


DISPATCH = {"ragged": ragged_experts, "dense": dense_experts}
