"""Calibration for GPTQ: per-expert Hessians from the tokens the full-precision model routes to each expert."""

# Inputs and routing come from the full-precision (teacher) model in every MoE block, not from a
# model whose earlier blocks are already quantized: one forward pass per batch gives every block's
# Hessians. One code path serves every model family: the MoE blocks are found in the params (the
# dicts holding a "w_in": model.moe_paths order, so a Switch Transformer's encoder blocks come
# before its decoder's), each block's input is the output of its sibling norm "mlp_norm" and its
# routing the expert ids its "moe" module returns, both captured from the forward
# (capture_intermediates). w_in (and w_gate, when the block has one) read the expert's input x;
# w_out reads the expert's hidden state, computed by the model's own expert function
# (dispatch.expert_hidden: SwiGLU silu(x W_gate) * (x W_in) with a w_gate, relu(x W_in) without).
#
# A token counts for an expert when the router chose it (top-k, before any capacity) and the
# expert's capacity (model.capacity_factor / expert_capacity) kept it: a dropped token never passes
# through the expert in the forward, so it says nothing about the expert's inputs. Padding is
# routed by the forward like any token, but nothing reads its output (attention masks the
# source's padding, the loss the target's), so a batch may say which positions count: a
# calibration batch is (the forward's inputs, {stack: bool [B, len]}) and a block under a named
# stack (its path's first key, e.g. "encoder") counts only the True positions.

from __future__ import annotations

import functools
from typing import Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moeqjax.data import sample_batch
from moeqjax.model import MoETransformer
from moeqjax.model.capacity import capacity_keep
from moeqjax.model.dispatch import expert_hidden
from moeqjax.model.moe_paths import at_path, moe_paths

MOE_INPUT = "mlp_norm"  # the block's norm whose output is the MoE input
MOE = "moe"  # the MoE module (returns (y, aux) with aux["expert_idx"])
EXPERT_LEAF = "w_in"  # the param every routed-expert block holds


class ExpertHessians(NamedTuple):
  """Per MoE block (model.moe_paths order): H = 2 X^T X / n over the tokens routed to each expert."""

  h_in: list  # L x [E, D, D] numpy, for w_in (and w_gate)
  h_out: list  # L x [E, F, F] numpy, for w_out
  tokens: np.ndarray  # [L, E] routed (and kept) tokens per expert


def expert_blocks(params) -> list[tuple[str, ...]]:
  """Key paths of the routed-expert blocks in `params`, in model.moe_paths order."""
  return moe_paths(params, EXPERT_LEAF)


def _is_moe_io(module, method_name) -> bool:
  return method_name == "__call__" and module.name in (MOE_INPUT, MOE)


def _routed(moe_cfg, idx_TxK, b: int, s: int):
  """float [T, E]: 1 where the token's expert took it (router's choice, capacity kept)."""
  hot_TxKxE = jax.nn.one_hot(idx_TxK, moe_cfg.num_experts)
  if moe_cfg.has_capacity:  # the forward's own rule (per sequence, earlier tokens first)
    keep_TxK = capacity_keep(idx_TxK.reshape(b, s, -1), moe_cfg.num_experts,
                             capacity_factor=moe_cfg.capacity_factor,
                             capacity=moe_cfg.expert_capacity).reshape(idx_TxK.shape)
    hot_TxKxE = hot_TxKxE * keep_TxK[..., None]
  return hot_TxKxE.max(axis=1)  # a token's k experts differ


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_sums(model, moe_cfg, params, inputs, counted):
  """Per MoE block (sum x x^T [E, D, D], sum h h^T [E, F, F], count [E]) over one batch.

  Args:
    model: the flax model; `model.apply({"params": params}, *inputs)` is the forward.
    moe_cfg: the MoE blocks' ModelConfig (num_experts, capacity).
    counted: {stack: bool [B, len]}, the positions that count in that stack's blocks.
  """
  _, state = model.apply({"params": params}, *inputs, capture_intermediates=_is_moe_io,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  sums = []
  for path in expert_blocks(params):
    x_BxSxD = at_path(inter, path[:-1] + (MOE_INPUT,))["__call__"][0]
    idx_TxK = at_path(inter, path)["__call__"][0][1]["expert_idx"]
    b, s, d = x_BxSxD.shape
    x_TxD = x_BxSxD.reshape(b * s, d).astype(jnp.float32)
    routed_TxE = _routed(moe_cfg, idx_TxK, b, s)
    if path[0] in counted:
      routed_TxE = routed_TxE * counted[path[0]].reshape(b * s, 1).astype(routed_TxE.dtype)
    moe = at_path(params, path)
    h_TxExF = expert_hidden(
        lambda w: jnp.einsum("td,edf->tef", x_TxD, w.astype(jnp.float32)), moe["w_in"],
        moe.get("w_gate"))
    sums.append((jnp.einsum("te,td,tc->edc", routed_TxE, x_TxD, x_TxD),
                 jnp.einsum("te,tef,teg->efg", routed_TxE, h_TxExF, h_TxExF),
                 routed_TxE.sum(axis=0)))
  return sums


class CalibBatch(NamedTuple):
  """One calibration batch: the forward's positional inputs, and per stack the positions that
  count (bool [B, len]; a stack not named counts every position)."""

  inputs: tuple
  counted: dict = {}


def model_hessians(model, moe_cfg, params, batches: Iterable[CalibBatch], *, num_batches=None,
                   progress: bool = False) -> ExpertHessians:
  """Accumulates every MoE block's per-expert Hessians over calibration batches.

  Args:
    model: the flax model (MoETransformer, SwitchTransformer).
    moe_cfg: the MoE blocks' ModelConfig (SwitchConfig.moe_config() for a Switch model).
    params: the full-precision params (routing and inputs come from them).
    batches: CalibBatch per batch (inputs: tokens; or encoder ids, decoder ids, encoder mask).
    num_batches: the progress bar's total.
    progress: draw a progress bar over the batches.

  Returns:
    ExpertHessians; an expert that got no tokens has an all-zero Hessian and a count of 0.
  """
  total = None
  for batch in tqdm(batches, desc="gptq calibration", total=num_batches, disable=not progress,
                    dynamic_ncols=True):
    sums = _batch_sums(model, moe_cfg, params, tuple(jnp.asarray(x) for x in batch.inputs),
                       {k: jnp.asarray(v, bool) for k, v in batch.counted.items()})
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  if total is None:
    raise ValueError("GPTQ calibration needs at least one batch")
  h_in, h_out, counts = [], [], []
  for s_in, s_out, count in total:
    count = np.asarray(count)
    denom = np.maximum(count, 1.0)[:, None, None]
    h_in.append(2.0 * np.asarray(s_in) / denom)
    h_out.append(2.0 * np.asarray(s_out) / denom)
    counts.append(count.astype(np.int64))
  return ExpertHessians(h_in, h_out, np.stack(counts))


def expert_hessians(cfg, params, train_tokens: np.ndarray, *, batches: int, batch_size: int,
                    seq_len: int, seed: int, progress: bool = False) -> ExpertHessians:
  """A decoder-only model's Hessians over `batches` random training windows (sample_batch at steps
  0..batches-1, batch_size x seq_len tokens); model_hessians does the work."""
  windows = (CalibBatch((sample_batch(train_tokens, batch_size, seq_len, seed, step)[:, :-1],))
             for step in range(batches))
  return model_hessians(MoETransformer(cfg), cfg, params, windows, num_batches=batches,
                        progress=progress)
