"""Dropless expert parallelism: tokens travel to their expert's shard and back (shard_map)."""

# Each device of the mesh's `expert` axis holds E/n experts and its own rows of the batch. Inside
# jax.shard_map a device sorts its (token, k) pairs by expert, sends every pair to the shard that
# owns its expert (exact per-expert counts are exchanged first), the owner runs one ragged_dot
# over its local experts, and the rows come back to the source, which combines them with the gates.
#
# The exchange is jax.lax.all_to_all with one slot of T_local*k rows per (source, destination)
# pair: XLA:CPU in jax 0.10.2 has no ragged-all-to-all ("HLO opcode `ragged-all-to-all` is not
# supported by XLA:CPU ThunkEmitter"), so the exact-size jax.lax.ragged_all_to_all cannot run or
# be tested here. A slot holds every row a source could send to one shard, so nothing is ever
# dropped; the counts decide which slot rows are real.
#
# The local experts enter whole (in_specs split only their E axis): weights sharded over fsdp or
# tensor are gathered for the block, as FSDP does, and devices along `tensor` compute the same rows.

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from moeqjax.model.dispatch import combine, expert_hidden, ragged_experts

EXPERT_AXIS = "expert"
# Mesh axes the token rows may be split over (moeqjax.train.mesh's default batch rule). Tokens
# split differently are resharded by XLA on the way in; the result does not depend on it.
TOKEN_AXES = ("data", "fsdp", "expert")


def _exchange(x_MxD, expert_M, num_experts, n, compute):
  """Per device: rows sorted by global expert -> `compute` on their owners -> rows back, same order.

  Args:
    x_MxD: this device's rows, sorted by expert_M.
    expert_M: the global expert of each row (ascending); E for a row dropped by the capacity,
      which is sent nowhere (its output row is unspecified; the caller masks it).
    num_experts: E, all shards together.
    n: the size of the expert axis.
    compute: (rows_RxD, group_sizes_L) -> [R, D'] on the owner; rows arrive grouped by local
      expert (group l has group_sizes_L[l] rows), then padding rows, whose outputs are dropped.

  Returns:
    [M, D'] compute's output for each row, in the input order.
  """
  m = x_MxD.shape[0]
  local = num_experts // n
  counts_NxL = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32).reshape(n, local)
  send_N = jnp.sum(counts_NxL, axis=1)
  start_N = jnp.cumsum(send_N) - send_N
  # Slot c of destination j holds sorted row start_N[j] + c when c < send_N[j].
  slot_C = jnp.arange(m)
  src_NxC = jnp.minimum(start_N[:, None] + slot_C[None, :], m - 1)
  valid_NxC = slot_C[None, :] < send_N[:, None]
  send = jnp.where(valid_NxC[..., None], jnp.take(x_MxD, src_NxC, axis=0), 0)
  # The exact counts first: row i of recv_counts is what source i sends to each local expert.
  recv_counts_NxL = jax.lax.all_to_all(counts_NxL, EXPERT_AXIS, 0, 0, tiled=True)
  recv = jax.lax.all_to_all(send, EXPERT_AXIS, 0, 0, tiled=True)
  # Local expert of slot (i, c): how many of source i's expert groups end at or before c (L: pad).
  ends_NxL = jnp.cumsum(recv_counts_NxL, axis=1)
  expert_NxC = jnp.sum(slot_C[None, :, None] >= ends_NxL[:, None, :], axis=-1)
  order_R = jnp.argsort(expert_NxC.reshape(-1), stable=True)
  rows = jnp.take(recv.reshape(n * m, -1), order_R, axis=0)
  y = compute(rows, jnp.sum(recv_counts_NxL, axis=0))
  y = jnp.take(y, jnp.argsort(order_R), axis=0).reshape(n, m, -1)
  back = jax.lax.all_to_all(y, EXPERT_AXIS, 0, 0, tiled=True)
  # Row r went to shard expert_M[r] // local, slot r - start of that shard (dropped rows: any).
  dest_M = jnp.minimum(expert_M // local, n - 1)
  return back[dest_M, jnp.arange(m) - start_N[dest_M]]


def _grouped_experts(w_in_LxDxF, w_gate_LxDxF, w_out_LxFxD):
  """The owner's computation: its local experts as one grouped matmul per projection."""
  def compute(rows, group_sizes_L):
    h = expert_hidden(lambda w: jax.lax.ragged_dot(rows, w, group_sizes_L), w_in_LxDxF,
                      w_gate_LxDxF)
    return jax.lax.ragged_dot(h, w_out_LxFxD, group_sizes_L)
  return compute


def _sorted_pairs(idx_TxK):
  """(order_M, expert_M): the (token, k) pairs sorted by expert, stable, and their experts."""
  flat_M = idx_TxK.reshape(-1)
  order_M = jnp.argsort(flat_M, stable=True)
  return order_M, jnp.take(flat_M, order_M)


def _local_experts(x_TxD, w_in, w_gate, w_out, gates_TxK, idx_TxK, act_quant_E, x_q_TxD,
                   keep_TxK, *, num_experts, n):
  """One device's part of expert_parallel_experts (inside shard_map)."""
  t, k = idx_TxK.shape
  if keep_TxK is not None:
    # Pairs over capacity get the id E: sorted last, counted for no shard, never sent.
    idx_TxK = jnp.where(keep_TxK, idx_TxK, num_experts)
  order_M, expert_M = _sorted_pairs(idx_TxK)
  token_M = order_M // k
  x_MxD = jnp.take(x_TxD, token_M, axis=0)
  if x_q_TxD is not None:
    # The source knows each row's expert, so it sends the input that expert reads.
    reads_q_M = act_quant_E[jnp.minimum(expert_M, num_experts - 1)]
    x_MxD = jnp.where(reads_q_M[:, None], jnp.take(x_q_TxD, token_M, axis=0), x_MxD)
  y_MxD = _exchange(x_MxD, expert_M, num_experts, n, _grouped_experts(w_in, w_gate, w_out))
  y_TxKxD = jnp.take(y_MxD, jnp.argsort(order_M), axis=0).reshape(t, k, -1)
  return combine(y_TxKxD, gates_TxK, keep_TxK)


def _expert_mesh():
  """The context mesh when it has an expert axis larger than 1, else None."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or EXPERT_AXIS not in mesh.axis_names or mesh.shape[EXPERT_AXIS] == 1:
    return None
  return mesh


def _token_spec(mesh, num_tokens):
  axes = tuple(a for a in TOKEN_AXES if a in mesh.axis_names)
  shards = 1
  for a in axes:
    shards *= mesh.shape[a]
  if num_tokens % shards:
    raise ValueError(f"model.dispatch='ep': {num_tokens} tokens do not split over the {shards} "
                     f"token shards ({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)}); use a "
                     f"batch that is a multiple of {shards}")
  return PartitionSpec(axes)


def expert_parallel_experts(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK, *,
                            x_q_TxD=None, act_quant_E=None, keep_TxK=None):
  """Dropless expert-parallel MoE over the context mesh's `expert` axis (jax.set_mesh).

  Arguments and result as in dispatch.dense_experts. Without a context mesh, or with an expert
  axis of size 1, this is dispatch.ragged_experts (the same grouped matmul on one shard). With
  keep_TxK (a capacity), the dropped pairs are not sent: a shard receives at most the capacity
  of rows per local expert, from all sources together.
  """
  mesh = _expert_mesh()
  if mesh is None:
    return ragged_experts(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK,
                          x_q_TxD=x_q_TxD, act_quant_E=act_quant_E, keep_TxK=keep_TxK)
  num_experts, n = w_in_ExDxF.shape[0], mesh.shape[EXPERT_AXIS]
  if num_experts % n:
    raise ValueError(f"model.num_experts = {num_experts} is not divisible by expert = {n}; "
                     "choose mesh sizes that divide it")
  tok, ex, rep = _token_spec(mesh, x_TxD.shape[0]), PartitionSpec(EXPERT_AXIS), PartitionSpec()
  body = functools.partial(_local_experts, num_experts=num_experts, n=n)
  return jax.shard_map(
      body, mesh=mesh, out_specs=tok,
      in_specs=(tok, ex, None if w_gate_ExDxF is None else ex, ex, tok, tok,
                None if act_quant_E is None else rep,
                None if x_q_TxD is None else tok, None if keep_TxK is None else tok),
  )(x_TxD, w_in_ExDxF, w_gate_ExDxF, w_out_ExFxD, gates_TxK, idx_TxK, act_quant_E, x_q_TxD,
    keep_TxK)


def pair_counts(idx_TxK, num_experts, keep_TxK=None):
  """Which (token, k) pairs came back computed, by which expert, and how many rows ran in all.

  The same exchange as expert_parallel_experts (with keep_TxK: its capacity drops) with a
  computation that reports, per received row, 1 and the global expert that ran it (padding rows
  report 0 and -1). Returns (done_TxK, expert_TxK, rows): a dropped pair shows as done 0 and
  expert -1, a misrouted one as an expert other than idx_TxK's, and a duplicated one as rows
  (summed over all shards) above the pairs sent.
  """
  mesh = _expert_mesh()
  if mesh is None:
    raise ValueError("pair_counts needs a context mesh with an expert axis > 1 (jax.set_mesh)")
  n = mesh.shape[EXPERT_AXIS]
  tok = _token_spec(mesh, idx_TxK.shape[0])
  computed = []  # the rows this shard ran, from inside the exchange

  def body(idx, keep):
    t, k = idx.shape
    if keep is not None:
      idx = jnp.where(keep, idx, num_experts)  # as _local_experts: never sent
    order_M, expert_M = _sorted_pairs(idx)
    base = jax.lax.axis_index(EXPERT_AXIS) * (num_experts // n)

    def report(rows, group_sizes_L):
      r = jnp.arange(rows.shape[0])
      local_R = jnp.sum(r[:, None] >= jnp.cumsum(group_sizes_L)[None, :], axis=1)
      real = r < jnp.sum(group_sizes_L)
      computed.append(jnp.sum(group_sizes_L))
      return jnp.stack([real.astype(jnp.int32), jnp.where(real, base + local_R, -1)], axis=1)

    ones = jnp.ones((t * k, 1), jnp.int32)
    got = _exchange(ones, expert_M, num_experts, n, report)
    got = jnp.take(got, jnp.argsort(order_M), axis=0).reshape(t, k, 2)
    if keep is not None:  # a dropped pair's row came back from nowhere
      got = jnp.where(keep[..., None], got, jnp.asarray([0, -1], jnp.int32))
    return got[..., 0], got[..., 1], jax.lax.psum(computed[0], tok[0])

  return jax.shard_map(body, mesh=mesh, in_specs=(tok, None if keep_TxK is None else tok),
                       out_specs=(tok, tok, PartitionSpec()))(idx_TxK, keep_TxK)
