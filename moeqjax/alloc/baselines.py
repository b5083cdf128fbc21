"""Baseline allocations: uniform, random, activation frequency, mean gate weight, and MC-MoE."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from moeqjax.alloc.paper import allocate_by_order
from moeqjax.alloc.solver import solve_exact
from moeqjax.quant import formats


def _check_stat(name: str, x, what: str) -> np.ndarray:
  arr = np.asarray(x, dtype=np.float64)
  if arr.ndim != 2:
    raise ValueError(f"{name} has shape {arr.shape} but must be [L, E] ({what})")
  if not np.all(np.isfinite(arr)) or np.any(arr < 0):
    raise ValueError(f"{name} must be finite and >= 0 ({what})")
  return arr


def _check_dims(num_layers: int, num_experts: int) -> None:
  for name, v in (("num_layers", num_layers), ("num_experts", num_experts)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"{name}={v!r} must be a non-negative int")


def uniform(num_layers: int, num_experts: int, code: int) -> np.ndarray:
  """Every expert at the same code.

  Args:
    num_layers: L.
    num_experts: E.
    code: the bit code, e.g. 1 (ternary) or 4.

  Returns:
    [L, E] int32 codes.
  """
  _check_dims(num_layers, num_experts)
  code = int(formats.validate_codes(code))
  return np.full((num_layers, num_experts), code, dtype=np.int32)


def random_alloc(num_layers: int, num_experts: int, b_avg: float, levels: Sequence[int], seed: int,
                 code_bits: Mapping[int, float] | None = None) -> np.ndarray:
  """A random order per layer, then the paper's level rule (same counts as the informed methods).

  Args:
    num_layers: L.
    num_experts: E.
    b_avg: target average bits per weight over each layer's experts.
    levels: (high, low) or (high, mid, low) codes.
    seed: seed of numpy's default_rng; the same seed gives the same allocation.
    code_bits: code -> bits; None means paper.NOMINAL_BITS.

  Returns:
    [L, E] int32 codes.
  """
  _check_dims(num_layers, num_experts)
  rng = np.random.default_rng(seed)
  order = np.array([rng.permutation(num_experts) for _ in range(num_layers)], dtype=np.int64)
  order = order.reshape(num_layers, num_experts)
  return allocate_by_order(order, b_avg, levels, code_bits)


def _descending_order(score_LxE: np.ndarray) -> np.ndarray:
  # Stable sort of the negated score: larger first, ties keep the lower expert index first.
  return np.argsort(-score_LxE, axis=1, kind="stable")


def by_frequency(counts_LxE, b_avg: float, levels: Sequence[int],
                 code_bits: Mapping[int, float] | None = None) -> np.ndarray:
  """More frequently activated experts get the high level (the paper's level rule per layer).

  Args:
    counts_LxE: [L, E] activation counts (or frequencies) of each expert.
    b_avg: target average bits per weight over each layer's experts.
    levels: (high, low) or (high, mid, low) codes.
    code_bits: code -> bits; None means paper.NOMINAL_BITS.

  Returns:
    [L, E] int32 codes.
  """
  counts = _check_stat("counts_LxE", counts_LxE, "activation counts")
  return allocate_by_order(_descending_order(counts), b_avg, levels, code_bits)


def by_gate_weight(mean_gate_LxE, b_avg: float, levels: Sequence[int],
                   code_bits: Mapping[int, float] | None = None) -> np.ndarray:
  """Experts with a larger mean routing (gate) weight get the high level.

  Args:
    mean_gate_LxE: [L, E] mean gate weight of each expert over the tokens routed to it.
    b_avg: target average bits per weight over each layer's experts.
    levels: (high, low) or (high, mid, low) codes.
    code_bits: code -> bits; None means paper.NOMINAL_BITS.

  Returns:
    [L, E] int32 codes.
  """
  gate = _check_stat("mean_gate_LxE", mean_gate_LxE, "mean gate weights")
  return allocate_by_order(_descending_order(gate), b_avg, levels, code_bits)


def mc_moe_importance(freq_LxE, gate_LxE, alpha: float = 1.0, beta: float = 1.5) -> np.ndarray:
  """MC-MoE expert importance f_s^alpha * g_s^beta.

  f_s is expert s's share of its layer's activations: the input is normalised per layer to sum to 1,
  so raw counts and frequencies give the same importance, and layers with more tokens do not
  outweigh others in the global solve. A layer with no activations gets importance 0.

  Args:
    freq_LxE: [L, E] activation counts or frequencies, >= 0.
    gate_LxE: [L, E] mean gate weights, >= 0.
    alpha: exponent of the frequency (MC-MoE: 1).
    beta: exponent of the gate weight (MC-MoE: 1.5).

  Returns:
    [L, E] float64 importance.
  """
  freq = _check_stat("freq_LxE", freq_LxE, "activation counts or frequencies")
  gate = _check_stat("gate_LxE", gate_LxE, "mean gate weights")
  if freq.shape != gate.shape:
    raise ValueError(
        f"freq_LxE has shape {freq.shape} but gate_LxE has {gate.shape}; both must be [L, E]")
  total = np.sum(freq, axis=1, keepdims=True)
  share = np.divide(freq, total, out=np.zeros_like(freq), where=total > 0)
  return share ** float(alpha) * gate ** float(beta)


def mc_moe(freq_LxE, gate_LxE, err_LxExC, bytes_LxExC, budget_bytes, choices: Sequence[int],
           alpha: float = 1.0, beta: float = 1.5) -> np.ndarray:
  """MC-MoE style allocation: cost = importance * quantization error, solved as an integer program.

  The integer program (one global byte budget over all layers) is solved exactly by solve_exact.

  Args:
    freq_LxE: [L, E] activation counts or frequencies.
    gate_LxE: [L, E] mean gate weights.
    err_LxExC: [L, E, C] quantization error of each expert under each choice, e.g. weight MSE.
    bytes_LxExC: [L, E, C] bytes of each choice (see bytes_table).
    budget_bytes: total byte budget.
    choices: C codes, the code of each choice index.
    alpha: exponent of the frequency.
    beta: exponent of the gate weight.

  Returns:
    [L, E] int32 codes.
  """
  importance = mc_moe_importance(freq_LxE, gate_LxE, alpha, beta)
  err = np.asarray(err_LxExC, dtype=np.float64)
  if err.ndim != 3 or err.shape[:2] != importance.shape:
    raise ValueError(
        f"err_LxExC has shape {err.shape} but must be [L, E, C] with [L, E] = {importance.shape}")
  if np.any(err < 0) or np.any(np.isnan(err)):
    raise ValueError(
        "err_LxExC must be >= 0 (a quantization error such as MSE), or +inf to forbid a choice")
  # 0 * inf would be NaN: a forbidden choice stays forbidden even for an expert of zero importance.
  cost = np.where(np.isinf(err), np.inf, importance[..., None] * np.where(np.isinf(err), 0.0, err))
  return solve_exact(cost, bytes_LxExC, budget_bytes, choices)
