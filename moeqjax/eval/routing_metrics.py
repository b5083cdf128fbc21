"""Routing consistency against the full-precision model, and expert load."""

from __future__ import annotations

import numpy as np


def _membership(idx_LxTxK: np.ndarray, num_experts: int) -> np.ndarray:
  """[L, T, E] 0/1: whether each expert is in the token's top-k set."""
  member = np.zeros(idx_LxTxK.shape[:2] + (num_experts,), dtype=np.int32)
  np.put_along_axis(member, idx_LxTxK, 1, axis=-1)
  return member


def _token_mean(values_LxT: np.ndarray, token_mask_T) -> np.ndarray:
  """[L]: the mean over tokens, or over the tokens where token_mask_T is True."""
  if token_mask_T is None:
    return np.mean(values_LxT, axis=1)
  w_T = np.asarray(token_mask_T, np.float64).reshape(-1)
  return np.sum(values_LxT * w_T, axis=1) / max(float(w_T.sum()), 1.0)


def routing_agreement(ref_idx_LxTxK: np.ndarray, idx_LxTxK: np.ndarray, num_experts: int,
                      token_mask_T=None) -> dict:
  """Per-layer agreement of a model's routing with the reference (full-precision) routing.

  Expert ids must be ordered by gate, as lax.top_k returns them, so column 0 is top-1.
  token_mask_T (bool [T], optional) restricts the means to the tokens where it is True (e.g. not
  padding).

  Returns:
    {"topk_agree": [L], "top1_agree": [L], "changed_frac": [L]}: the mean over tokens of
    |T_k ∩ T̂_k| / k, of [top-1 equal], and of [T̂_k != T_k].
  """
  ref_idx_LxTxK, idx_LxTxK = np.asarray(ref_idx_LxTxK), np.asarray(idx_LxTxK)
  if ref_idx_LxTxK.shape != idx_LxTxK.shape:
    raise ValueError(f"routing shapes differ: {ref_idx_LxTxK.shape} vs {idx_LxTxK.shape}")
  k = ref_idx_LxTxK.shape[-1]
  overlap_LxT = np.sum(_membership(ref_idx_LxTxK, num_experts) *
                       _membership(idx_LxTxK, num_experts), axis=-1)
  return {
      "topk_agree": _token_mean(overlap_LxT / k, token_mask_T),
      "top1_agree": _token_mean(ref_idx_LxTxK[..., 0] == idx_LxTxK[..., 0], token_mask_T),
      "changed_frac": _token_mean(overlap_LxT < k, token_mask_T),
  }


def window_agreement(ref_idx_LxTxK: np.ndarray, idx_LxTxK: np.ndarray, num_experts: int,
                     num_windows: int, token_mask_T=None) -> dict:
  """Agreement with the reference routing per evaluation window, averaged over layers and tokens.

  Tokens are in window order (as evaluate_lm returns them), T = num_windows * S. Windows have equal
  length, so the mean over windows equals the mean of routing_agreement's per-layer values; the
  per-window values are what a paired standard error over windows needs. With token_mask_T
  (bool [T]) a window's value is its mean over the tokens where the mask is True (0 when none
  is), so windows weigh equally whatever their padding.

  Returns:
    {"topk_agree": [N], "top1_agree": [N]}.
  """
  ref_idx_LxTxK, idx_LxTxK = np.asarray(ref_idx_LxTxK), np.asarray(idx_LxTxK)
  if ref_idx_LxTxK.shape != idx_LxTxK.shape:
    raise ValueError(f"routing shapes differ: {ref_idx_LxTxK.shape} vs {idx_LxTxK.shape}")
  num_layers, tokens, k = ref_idx_LxTxK.shape
  if num_windows < 1 or tokens % num_windows:
    raise ValueError(f"{tokens} routed tokens do not split into {num_windows} equal windows")
  overlap_LxT = np.sum(_membership(ref_idx_LxTxK, num_experts) *
                       _membership(idx_LxTxK, num_experts), axis=-1)
  top1_LxT = ref_idx_LxTxK[..., 0] == idx_LxTxK[..., 0]
  shape = (num_layers, num_windows, tokens // num_windows)
  if token_mask_T is None:
    return {"topk_agree": np.mean(overlap_LxT.reshape(shape) / k, axis=(0, 2)),
            "top1_agree": np.mean(top1_LxT.reshape(shape), axis=(0, 2))}
  w_NxS = np.asarray(token_mask_T, np.float64).reshape(shape[1:])
  count_N = np.maximum(num_layers * w_NxS.sum(axis=1), 1.0)
  return {"topk_agree": np.sum(overlap_LxT.reshape(shape) / k * w_NxS, axis=(0, 2)) / count_N,
          "top1_agree": np.sum(top1_LxT.reshape(shape) * w_NxS, axis=(0, 2)) / count_N}


def expert_load(idx_LxTxK: np.ndarray, num_experts: int) -> np.ndarray:
  """Fraction of top-k assignments each expert receives, [L, E] (rows sum to 1)."""
  counts = np.sum(_membership(np.asarray(idx_LxTxK), num_experts), axis=1).astype(np.float64)
  return counts / counts.sum(axis=-1, keepdims=True)


def load_drift_kl(ref_load_LxE: np.ndarray, load_LxE: np.ndarray, eps: float = 1e-9) -> np.ndarray:
  """KL(ref load || load) per layer, in nats; eps keeps empty experts finite."""
  p = np.asarray(ref_load_LxE) + eps
  q = np.asarray(load_LxE) + eps
  p, q = p / p.sum(-1, keepdims=True), q / q.sum(-1, keepdims=True)
  return np.sum(p * np.log(p / q), axis=-1)
