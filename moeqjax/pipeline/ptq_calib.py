"""Calibration for GPTQ: per-expert Hessians from the tokens the full-precision model routes to each expert."""

# Inputs and routing come from the full-precision (teacher) model in every layer, not from a model
# whose earlier layers are already quantized: one forward pass per batch gives every layer's
# Hessians. w_in and w_gate share the expert's input x (the MoE block's normed input); w_out's input
# is the expert's SwiGLU hidden h = silu(x W_gate) * (x W_in).

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moeqjax.data import sample_batch
from moeqjax.model import MoETransformer
from moeqjax.model.dispatch import swiglu
from moeqjax.model.transformer import routing_aux

_MOE_INPUT = "mlp_norm"  # the Block's norm whose output is the MoE input


class ExpertHessians(NamedTuple):
  """Per layer: H = 2 X^T X / n over the tokens routed to each expert."""

  h_in: list  # L x [E, D, D] numpy, for w_in and w_gate
  h_out: list  # L x [E, F, F] numpy, for w_out
  tokens: np.ndarray  # [L, E] routed tokens per expert


def _is_moe_input(module, method_name) -> bool:
  return module.name == _MOE_INPUT and method_name == "__call__"


@functools.partial(jax.jit, static_argnums=(0,))
def _batch_sums(model: MoETransformer, params, tokens_BxS):
  """Per layer (sum x x^T [E, D, D], sum h h^T [E, F, F], count [E]) over one batch."""
  cfg = model.cfg
  _, state = model.apply({"params": params}, tokens_BxS, capture_intermediates=_is_moe_input,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  idx_LxTxK = routing_aux(inter)["expert_idx"]
  sums = []
  for layer in range(cfg.num_layers):
    x_TxD = inter[f"layers_{layer}"][_MOE_INPUT]["__call__"][0]
    x_TxD = x_TxD.reshape(-1, cfg.d_model).astype(jnp.float32)
    routed_TxE = jax.nn.one_hot(idx_LxTxK[layer], cfg.num_experts).max(axis=1)
    moe = params[f"layers_{layer}"]["moe"]
    h_TxExF = swiglu(jnp.einsum("td,edf->tef", x_TxD, moe["w_gate"].astype(jnp.float32)),
                     jnp.einsum("td,edf->tef", x_TxD, moe["w_in"].astype(jnp.float32)))
    sums.append((jnp.einsum("te,td,tc->edc", routed_TxE, x_TxD, x_TxD),
                 jnp.einsum("te,tef,teg->efg", routed_TxE, h_TxExF, h_TxExF),
                 routed_TxE.sum(axis=0)))
  return sums


def expert_hessians(cfg, params, train_tokens: np.ndarray, *, batches: int, batch_size: int,
                    seq_len: int, seed: int, progress: bool = False) -> ExpertHessians:
  """Accumulates every layer's per-expert Hessians over `batches` random training windows.

  Args:
    cfg: the ModelConfig.
    params: the full-precision params (routing and inputs come from them).
    train_tokens: the training split's token ids.
    batches, batch_size, seq_len, seed: the calibration batches (sample_batch at steps 0..batches-1).
    progress: draw a progress bar over the batches.

  Returns:
    ExpertHessians; an expert that got no tokens has an all-zero Hessian and a count of 0.
  """
  model = MoETransformer(cfg)
  total = None
  for step in tqdm(range(batches), desc="gptq calibration", disable=not progress,
                   dynamic_ncols=True):
    tokens = jnp.asarray(sample_batch(train_tokens, batch_size, seq_len, seed, step)[:, :-1])
    sums = _batch_sums(model, params, tokens)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  h_in, h_out, counts = [], [], []
  for s_in, s_out, count in total:
    count = np.asarray(count)
    denom = np.maximum(count, 1.0)[:, None, None]
    h_in.append(2.0 * np.asarray(s_in) / denom)
    h_out.append(2.0 * np.asarray(s_out) / denom)
    counts.append(count.astype(np.int64))
  return ExpertHessians(h_in, h_out, np.stack(counts))
