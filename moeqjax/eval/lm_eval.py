"""Held-out loss (bits per token/byte) and routing decisions over fixed evaluation windows."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from moeqjax.model import ModelConfig, MoETransformer, forward_with_aux
from moeqjax.model.capacity import capacity_keep
from moeqjax.objectives import token_nll
from moeqjax.train.mesh import replicated, traced_in_mesh
from moeqjax.train.sharding import EvalPlacement

# A progress bar appears only for an evaluation that takes longer than this (seconds), so that
# small evaluations print nothing; process 0 alone draws it.
BAR_DELAY_S = 5.0


@functools.lru_cache(maxsize=None)
def _eval_fn(cfg: ModelConfig, mesh: Mesh | None = None):
  """One compiled eval function per model config (and mesh); the variables are arguments, so
  every variant (full precision or any bit allocation) of a config reuses it.

  On a mesh the variables and the batch keep the shardings they come with, and the results come
  back replicated, so every process can read them.
  """
  model = MoETransformer(cfg)

  def fn(variables, batch):
    logits, aux = forward_with_aux(model, variables, batch[:, :-1])
    return jnp.sum(token_nll(logits, batch[:, 1:]), axis=1), aux["expert_idx"]

  if mesh is None:
    return jax.jit(fn)
  rep = replicated(mesh)
  return jax.jit(traced_in_mesh(fn, mesh), out_shardings=(rep, rep))


def evaluate_lm(cfg: ModelConfig, variables: dict, windows_NxS1: np.ndarray,
                batch_size: int, placement: EvalPlacement | None = None,
                desc: str | None = None) -> dict:
  """Scores next-token prediction on fixed windows.

  Args:
    cfg: the model config.
    variables: {"params": ...} (full precision) or with "quant" codes (fake-quantized).
    windows_NxS1: token windows [N, S+1]; a last partial batch is padded, and the padding
      rows are dropped from every result.
    batch_size: windows per forward pass; on a mesh rounded up to a multiple of the batch shards.
    placement: a mesh to evaluate on (moeqjax.train.sharding.eval_placement): the variables are
      put in their shardings and each batch is split by rows; every process of a multi-process
      run calls this with the same windows and gets the same results. None: the default device.
    desc: the label of a progress bar over the batches (stderr, process 0, only when the
      evaluation takes over BAR_DELAY_S seconds, removed when done); None: no bar.

  Returns:
    {"nll": nats per token, "bits_per_token": nll / ln 2, "tokens": count,
     "bits_per_window": np.ndarray [N] mean bits per token of each window (their mean is
     bits_per_token, since windows have equal length),
     "expert_idx": np.ndarray [L, N*S, K] routing decisions in window order,
     "drop_rate": with model.capacity_factor > 0, the fraction of the (token, k) pairs that the
       capacity dropped (all layers; per window of S tokens, so independent of batch_size),
       else None}.
  """
  if placement is None:
    fn, put = _eval_fn(cfg), jnp.asarray
  else:
    fn, put = _eval_fn(cfg, placement.mesh), placement.put_batch
    variables = placement.put_variables(variables)
    batch_size = placement.rows(batch_size)
  n, seq = windows_NxS1.shape[0], windows_NxS1.shape[1] - 1
  nll_parts, idx_parts = [], []
  starts = range(0, n, batch_size)
  bar = tqdm(starts, desc=desc, unit="batch", leave=False, dynamic_ncols=True, delay=BAR_DELAY_S,
             disable=desc is None or jax.process_index() != 0)
  for start in bar:
    batch = windows_NxS1[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:  # pad to keep one compiled shape
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    nll_B, idx = fn(variables, put(batch))
    nll_parts.append(np.asarray(nll_B, np.float64)[:real])
    idx_parts.append(np.asarray(idx)[:, :real * seq])
  tokens = n * seq
  nll_N = np.concatenate(nll_parts)
  nll = float(np.sum(nll_N)) / tokens
  idx_LxMxK = np.concatenate(idx_parts, axis=1)
  return {"nll": nll, "bits_per_token": nll / math.log(2), "tokens": tokens,
          "bits_per_window": nll_N / (seq * math.log(2)),
          "expert_idx": idx_LxMxK, "drop_rate": capacity_drop_rate(cfg, idx_LxMxK, seq)}


def capacity_drop_rate(cfg: ModelConfig, idx_LxMxK: np.ndarray, seq_len: int) -> float | None:
  """The fraction of routed pairs that the capacity (model.capacity_factor or expert_capacity)
  drops in windows of seq_len tokens (the rule the forward pass applied; None when dropless)."""
  if not cfg.has_capacity:
    return None
  num_layers, m, k = idx_LxMxK.shape
  windows_LNxSxK = jnp.asarray(idx_LxMxK).reshape(num_layers * (m // seq_len), seq_len, k)
  keep = capacity_keep(windows_LNxSxK, cfg.num_experts, capacity_factor=cfg.capacity_factor,
                       capacity=cfg.expert_capacity)
  return float(1.0 - np.mean(np.asarray(keep)))
