"""Per-expert sensitivity scores (router norm change, neuron variance, router gradients) and orders."""

# Convention shared by every score here: a score is "order-compatible" when sorting it ASCENDING puts
# the MOST sensitive expert first, i.e. the expert that should receive the most bits. The paper's
# Lambda already has that direction, so the other scores are made to follow it.

from __future__ import annotations

import numpy as np


def _as_float_array(name: str, x, ndim: int, layout: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != ndim:
    raise ValueError(
        f"{name} has shape {arr.shape} but must be {ndim}-d, laid out {layout}"
        + (" (add a leading layer axis with x[None] for a single layer)" if ndim >= 2 else ""))
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains NaN or inf; check the statistics that produced it")
  return arr


def router_norm_change(router_norm_start_LxE, router_norm_end_LxE) -> np.ndarray:
  """The paper's sensitivity Lambda_s = ||w_s(T)||_2 - ||w_s(0)||_2.

  Smaller Lambda means a MORE sensitive expert (it learned rarer features), so ascending order of
  Lambda puts the most sensitive expert first.

  Args:
    router_norm_start_LxE: [L, E] router row norms at the start of fine-tuning, or None for a released
      checkpoint without a starting router; the paper then uses the final norm alone.
    router_norm_end_LxE: [L, E] router row norms at the end of fine-tuning.

  Returns:
    [L, E] float64 Lambda.
  """
  end = _as_float_array("router_norm_end_LxE", router_norm_end_LxE, 2, "[L, E]")
  if router_norm_start_LxE is None:
    return end.copy()
  start = _as_float_array("router_norm_start_LxE", router_norm_start_LxE, 2, "[L, E]")
  if start.shape != end.shape:
    raise ValueError(
        f"router_norm_start_LxE has shape {start.shape} but router_norm_end_LxE has {end.shape};"
        " both must be [L, E] for the same model")
  return end - start


def router_row_norms(w_router_LxDxE) -> np.ndarray:
  """||w_s||_2 for each expert s: the norm of column s of each layer's [D, E] router kernel.

  Args:
    w_router_LxDxE: [L, D, E] router kernels (logits = x @ W_r); column s is row s of W_r^T.

  Returns:
    [L, E] float64 norms.
  """
  w = _as_float_array("w_router_LxDxE", w_router_LxDxE, 3, "[L, D, E]")
  return np.sqrt(np.sum(w * w, axis=1))


def neuron_variance(w_in_LxExDxF) -> np.ndarray:
  """V_s = max_i Var_j(W_in[s][j, i]): the largest variance of one hidden neuron's input weights.

  The variance is the population variance (ddof=0) over the D input weights of hidden neuron i, and
  the maximum runs over the F hidden neurons of expert s.

  Args:
    w_in_LxExDxF: [L, E, D, F] first FFN matrix of every expert (the one feeding the hidden units).

  Returns:
    [L, E] float64 V.
  """
  w = _as_float_array("w_in_LxExDxF", w_in_LxExDxF, 4, "[L, E, D, F]")
  if w.shape[2] == 0 or w.shape[3] == 0:
    raise ValueError(f"w_in_LxExDxF has shape {w.shape}; D and F must both be at least 1")
  return np.max(np.var(w, axis=2), axis=-1)


def sensitivity_order(score_LxE) -> np.ndarray:
  """Experts of each layer sorted by an order-compatible score, most sensitive (smallest) first.

  Ties keep the lower expert index first (stable sort), so the order is deterministic.

  Args:
    score_LxE: [L, E] scores, e.g. Lambda from router_norm_change.

  Returns:
    [L, E] int64 order; order[l, 0] is layer l's most sensitive expert.
  """
  score = _as_float_array("score_LxE", score_LxE, 2, "[L, E]")
  return np.argsort(score, axis=1, kind="stable")


def combined_order(lam_E, var_E, zeta: float = 3.0) -> np.ndarray:
  """The paper's "combined" order of one layer: Lambda order with high-variance experts promoted.

  Exact semantics:
    1. order = experts sorted by Lambda ascending (stable: ties keep the lower expert index first).
    2. For each expert e, taken in REVERSE of that initial order (least sensitive first): scan the
       CURRENT order from the front for the first expert e2 with zeta * V[e2] < V[e] (strict). If e2
       exists and sits ahead of e, remove e and re-insert it directly before e2. Otherwise (no such
       e2, or the first one is e itself or behind e) leave e where it is.
  Each expert is considered exactly once; later steps see the moves of earlier ones.

  Args:
    lam_E: [E] Lambda of one layer (order-compatible: smaller = more sensitive).
    var_E: [E] neuron variance V of the same layer, >= 0.
    zeta: promotion ratio, > 0; the paper uses 3.

  Returns:
    [E] int64 permutation, most sensitive expert first.
  """
  lam = _as_float_array("lam_E", lam_E, 1, "[E]")
  var = _as_float_array("var_E", var_E, 1, "[E]")
  if lam.shape != var.shape:
    raise ValueError(f"lam_E has shape {lam.shape} but var_E has {var.shape}; both must be [E]")
  if np.any(var < 0):
    raise ValueError("var_E has negative entries; pass variances such as neuron_variance(...)[l]")
  if not (np.isfinite(zeta) and zeta > 0):
    raise ValueError(f"zeta={zeta} must be a positive finite ratio such as 3.0")
  initial = [int(e) for e in np.argsort(lam, kind="stable")]
  current = list(initial)
  for e in reversed(initial):
    pos_e = current.index(e)
    # Only experts ahead of e can be jumped over, so the scan can stop at e's own position.
    for j in range(pos_e):
      if zeta * var[current[j]] < var[e]:
        current.pop(pos_e)
        current.insert(j, e)
        break
  return np.asarray(current, dtype=np.int64)


def combined_order_layers(lam_LxE, var_LxE, zeta: float = 3.0) -> np.ndarray:
  """combined_order applied to every layer.

  Args:
    lam_LxE: [L, E] Lambda.
    var_LxE: [L, E] neuron variance V.
    zeta: promotion ratio, > 0.

  Returns:
    [L, E] int64 orders, most sensitive expert first in each row.
  """
  lam = _as_float_array("lam_LxE", lam_LxE, 2, "[L, E]")
  var = _as_float_array("var_LxE", var_LxE, 2, "[L, E]")
  if lam.shape != var.shape:
    raise ValueError(f"lam_LxE has shape {lam.shape} but var_LxE has {var.shape}; both must be [L, E]")
  order = np.empty(lam.shape, dtype=np.int64)
  for l in range(lam.shape[0]):
    order[l] = combined_order(lam[l], var[l], zeta)
  return order


def grad_sensitivity(grad_norm_sum_LxE, counts_LxE=None, larger_is_more_sensitive: bool = False):
  """Online sensitivity from the accumulated router-gradient row norms sum_t ||dL/dw_s||_2.

  The returned score is order-compatible (ascending = most sensitive first), like Lambda.

  This is a separate signal from Lambda, reported beside it, not a proxy for it. Under plain SGD the
  norm change |Lambda_s| would be bounded by lr * sum_t ||dL/dw_s||. Under our optimizer (AdamW after
  global-norm clipping) it is not: Adam normalises every coordinate's step by its own gradient scale,
  clipping rescales all gradients together and decay shrinks rows regardless of the loss, so a row
  with tiny gradients can move as far as one with large gradients, and the two can order experts
  differently. Lambda (router_norm_change) stays the paper's default.

  Default direction (larger_is_more_sensitive=False): the score is the accumulated gradient norm
  itself (a row that received little gradient is read, like a small Lambda, as a MORE sensitive
  expert). Setting the flag to True negates the score for the opposite reading (a large gradient
  marks a sensitive expert), for ablations.

  Args:
    grad_norm_sum_LxE: [L, E] accumulated router-gradient row norms, >= 0.
    counts_LxE: optional [L, E] activation counts. When given, the score is the gradient norm per
      routed token, sum / max(count, 1), so that it does not simply mirror activation frequency
      (an expert never routed to gets the sum itself, normally 0).
    larger_is_more_sensitive: flip the direction, see above.

  Returns:
    [L, E] float64 order-compatible score.
  """
  g = _as_float_array("grad_norm_sum_LxE", grad_norm_sum_LxE, 2, "[L, E]")
  if np.any(g < 0):
    raise ValueError("grad_norm_sum_LxE has negative entries; it must accumulate norms, which are >= 0")
  if counts_LxE is not None:
    counts = _as_float_array("counts_LxE", counts_LxE, 2, "[L, E]")
    if counts.shape != g.shape:
      raise ValueError(f"counts_LxE has shape {counts.shape} but grad_norm_sum_LxE has {g.shape}")
    if np.any(counts < 0):
      raise ValueError("counts_LxE has negative entries; pass activation counts (>= 0)")
    g = g / np.maximum(counts, 1.0)
  return -g if larger_is_more_sensitive else g
