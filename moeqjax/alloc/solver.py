"""Exact budgeted bit allocation: a multiple-choice knapsack over experts, solved by DP."""

# Problem: every expert (item) takes exactly one choice c with cost[i, c] and bytes[i, c]; minimise the
# total cost subject to total bytes <= budget. Two exact solvers share the work:
#   * a dense DP over byte capacity when the table is small enough. Bytes are first reduced (each
#     item's cheapest allowed choice is subtracted, it is always paid) and then divided by the gcd of
#     all reduced byte values. Every reachable total is a multiple of that gcd, so the scaled problem
#     has exactly the same feasible set: the scaling is lossless, never an approximation.
#   * otherwise a sparse DP that keeps only the Pareto frontier of (bytes, cost) partial solutions,
#     pruned by a lower bound against a greedy incumbent (branch and bound on the frontier). It is
#     exact too; it raises rather than approximating when the frontier grows too large.
# Neither ever returns an allocation above the budget.

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from moeqjax.quant import formats

# Dense DP table cells (items x capacity units) allowed; 2e7 int8 back-pointers are 20 MB.
DEFAULT_MAX_CELLS = 20_000_000
# Partial solutions the sparse DP may keep per item before it gives up.
DEFAULT_MAX_STATES = 2_000_000


def _check_inputs(cost_LxExC, bytes_LxExC, budget_bytes, choices):
  cost = np.asarray(cost_LxExC, dtype=np.float64)
  if cost.ndim != 3:
    raise ValueError(f"cost_LxExC has shape {cost.shape} but must be [L, E, C]")
  if np.any(np.isnan(cost)) or np.any(cost == -np.inf):
    raise ValueError("cost_LxExC contains NaN or -inf; costs must be finite, or +inf to forbid a choice")
  nbytes = np.asarray(bytes_LxExC)
  if nbytes.shape != cost.shape:
    raise ValueError(
        f"bytes_LxExC has shape {nbytes.shape} but cost_LxExC has {cost.shape}; they must match")
  if nbytes.dtype.kind == "f":
    if not np.all(np.isfinite(nbytes)) or np.any(nbytes != np.round(nbytes)):
      raise ValueError("bytes_LxExC must hold whole bytes; round up with np.ceil before solving")
  elif nbytes.dtype.kind not in "iu":
    raise ValueError(f"bytes_LxExC must be an integer array, got dtype {nbytes.dtype}")
  nbytes = nbytes.astype(np.int64)
  if np.any(nbytes < 0):
    raise ValueError("bytes_LxExC has negative entries; byte counts must be >= 0")
  codes = [int(c) for c in formats.validate_codes(np.asarray(choices)).ravel()]
  if len(codes) != cost.shape[2]:
    raise ValueError(
        f"choices has {len(codes)} codes but cost_LxExC has C={cost.shape[2]} choices per expert")
  if len(set(codes)) != len(codes):
    raise ValueError(f"choices {codes} repeats a code; list each code once")
  if isinstance(budget_bytes, bool) or not np.isfinite(float(budget_bytes)):
    raise ValueError(f"budget_bytes={budget_bytes!r} must be a finite number of bytes")
  return cost, nbytes, codes, math.floor(float(budget_bytes))


def _describe_cheapest(cheapest_idx: np.ndarray, codes: Sequence[int]) -> str:
  used = np.unique(cheapest_idx)
  if used.size == 1:
    return f"all experts at {formats.code_name(codes[int(used[0])])} (code {codes[int(used[0])]})"
  return "every expert at its cheapest allowed choice"


def _dense_dp(cost_NxC, units_NxC, usable_NxC, cap_units: int) -> np.ndarray:
  """Exact DP over capacity units; f[w] = best cost of the items so far within w units."""
  n_items, n_choices = cost_NxC.shape
  width = cap_units + 1
  back = np.zeros((n_items, width), dtype=np.int8 if n_choices <= 127 else np.int16)
  # "Within w" (not "exactly w") semantics: with zero items any capacity costs 0.
  f = np.zeros(width)
  for i in range(n_items):
    new = np.full(width, np.inf)
    arg = np.zeros(width, dtype=back.dtype)
    for c in range(n_choices):
      if not usable_NxC[i, c]:
        continue
      b = int(units_NxC[i, c])
      cand = np.full(width, np.inf)
      cand[b:] = f[:width - b] + cost_NxC[i, c]
      better = cand < new  # strict: ties keep the earlier choice, so the result is deterministic
      new = np.where(better, cand, new)
      arg[better] = c
    f = new
    back[i] = arg
  idx = np.empty(n_items, dtype=np.int64)
  w = cap_units
  for i in range(n_items - 1, -1, -1):
    idx[i] = back[i, w]
    w -= int(units_NxC[i, idx[i]])
  return idx


def _greedy(cost_NxC, units_NxC, usable_NxC, cap_units: int) -> np.ndarray:
  """A feasible allocation for the upper bound: start at zero reduced bytes, buy the best upgrades."""
  n_items = cost_NxC.shape[0]
  rows = np.arange(n_items)
  idx = np.argmin(np.where(usable_NxC & (units_NxC == 0), cost_NxC, np.inf), axis=1)
  used = 0
  while True:
    d_cost = cost_NxC - cost_NxC[rows, idx][:, None]
    d_units = units_NxC - units_NxC[rows, idx][:, None]
    valid = usable_NxC & (d_cost < 0) & (d_units <= cap_units - used)
    if not np.any(valid):
      return idx
    # Cost saved per extra unit; a switch that saves cost without extra bytes is always taken first.
    gain = np.where(d_units > 0, -d_cost / np.maximum(d_units, 1), np.inf)
    i, c = np.unravel_index(np.argmax(np.where(valid, gain, -np.inf)), valid.shape)
    used += int(d_units[i, c])
    idx[i] = c


def _pareto_dp(cost_NxC, units_NxC, usable_NxC, cap_units: int, max_states: int) -> np.ndarray:
  """Exact sparse DP on the (bytes, cost) Pareto frontier with lower-bound pruning."""
  n_items = cost_NxC.shape[0]
  rows = np.arange(n_items)
  incumbent = _greedy(cost_NxC, units_NxC, usable_NxC, cap_units)
  upper = float(np.sum(cost_NxC[rows, incumbent]))
  # Lower bound on what items i.. still cost: each at its cheapest allowed choice, budget ignored.
  min_cost = np.min(np.where(usable_NxC, cost_NxC, np.inf), axis=1)
  suffix = np.concatenate([np.cumsum(min_cost[::-1])[::-1], [0.0]])
  # Float sums differ in the last bits between orders; the slack keeps the optimum's own path.
  slack = 1e-9 * max(1.0, abs(upper)) + 1e-12 * float(np.sum(np.abs(np.where(usable_NxC, cost_NxC, 0))))
  s_units = np.zeros(1, dtype=np.int64)
  s_cost = np.zeros(1)
  parents, picks = [], []
  for i in range(n_items):
    cs = np.flatnonzero(usable_NxC[i])
    n_states = s_units.size
    units = (s_units[None, :] + units_NxC[i, cs][:, None]).ravel()
    costs = (s_cost[None, :] + cost_NxC[i, cs][:, None]).ravel()
    parent = np.tile(np.arange(n_states), cs.size)
    pick = np.repeat(cs, n_states)
    keep = (units <= cap_units) & (costs + suffix[i + 1] <= upper + slack)
    units, costs, parent, pick = units[keep], costs[keep], parent[keep], pick[keep]
    # Pareto filter: by bytes, then cost; keep a state only if it is strictly cheaper than every
    # state that uses no more bytes (the others are dominated and cannot be on an optimal path).
    order = np.lexsort((costs, units))
    units, costs, parent, pick = units[order], costs[order], parent[order], pick[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(costs)[:-1]])
    keep = costs < best_before
    s_units, s_cost = units[keep], costs[keep]
    parents.append(parent[keep])
    picks.append(pick[keep])
    if s_units.size > max_states:
      raise ValueError(
          f"the exact solve needs more than max_states={max_states} partial solutions; round"
          " bytes_LxExC up to a coarser unit (e.g. np.ceil(bytes / 4096) * 4096) and the budget down"
          " to a multiple of it so the dense DP fits in max_cells, or raise max_states")
  # The incumbent is feasible, so the optimum (cost <= upper) survived every prune.
  state = int(np.argmin(s_cost))
  idx = np.empty(n_items, dtype=np.int64)
  for i in range(n_items - 1, -1, -1):
    idx[i] = picks[i][state]
    state = int(parents[i][state])
  return idx


def solve_exact(cost_LxExC, bytes_LxExC, budget_bytes, choices: Sequence[int], *,
                max_cells: int = DEFAULT_MAX_CELLS, max_states: int = DEFAULT_MAX_STATES) -> np.ndarray:
  """Minimum-cost allocation of one choice per expert with total bytes <= budget_bytes, solved exactly.

  Args:
    cost_LxExC: [L, E, C] cost of giving expert (l, e) choice c, e.g. quantization MSE weighted by
      sensitivity. +inf forbids that choice for that expert.
    bytes_LxExC: [L, E, C] whole bytes that choice takes, scales included (see bytes_table).
    budget_bytes: the byte budget for all experts together (see budget_from_bits); rounded down.
    choices: C bit codes, the code of each choice index, e.g. (1, 2, 3, 4, 8).
    max_cells: largest dense DP table (experts x capacity units) before the sparse exact DP is used.
    max_states: largest Pareto frontier the sparse DP may keep before it raises.

  Returns:
    [L, E] int32 codes of an optimal allocation; ties between equally cheap allocations are broken
    deterministically.

  Raises:
    ValueError: if the budget is below the cheapest possible allocation, or the inputs are malformed.
  """
  cost, nbytes, codes, budget = _check_inputs(cost_LxExC, bytes_LxExC, budget_bytes, choices)
  n_layers, n_experts, n_choices = cost.shape
  cost_NxC = cost.reshape(-1, n_choices)
  bytes_NxC = nbytes.reshape(-1, n_choices)
  allowed = np.isfinite(cost_NxC)
  if cost_NxC.shape[0] == 0:
    return np.zeros((n_layers, n_experts), dtype=np.int32)
  if not np.all(np.any(allowed, axis=1)):
    i = int(np.flatnonzero(~np.any(allowed, axis=1))[0])
    raise ValueError(
        f"expert (layer {i // n_experts}, expert {i % n_experts}) has cost +inf for every choice;"
        " allow at least one choice (finite cost) per expert")
  masked_bytes = np.where(allowed, bytes_NxC, np.iinfo(np.int64).max)
  cheapest = np.argmin(masked_bytes, axis=1)
  min_bytes = bytes_NxC[np.arange(cost_NxC.shape[0]), cheapest]
  floor_total = int(np.sum(min_bytes))
  if budget < floor_total:
    raise ValueError(
        f"budget {budget} bytes is below the smallest possible allocation"
        f" ({_describe_cheapest(cheapest, codes)}) of {floor_total} bytes; raise the budget or add a"
        " cheaper choice")
  cap = budget - floor_total
  # Each expert always pays its cheapest allowed choice; only the extra bytes compete for `cap`.
  extra = bytes_NxC - min_bytes[:, None]
  usable = allowed & (extra <= cap)
  unconstrained = np.argmin(np.where(usable, cost_NxC, np.inf), axis=1)
  if int(np.sum(extra[np.arange(extra.shape[0]), unconstrained])) <= cap:
    idx = unconstrained
  else:
    positive = extra[usable & (extra > 0)]
    unit = int(np.gcd.reduce(positive))
    units = np.where(usable, extra // unit, 0)
    cap_units = cap // unit
    if cost_NxC.shape[0] * (cap_units + 1) <= max_cells:
      idx = _dense_dp(cost_NxC, units, usable, cap_units)
    else:
      idx = _pareto_dp(cost_NxC, units, usable, cap_units, max_states)
  return np.asarray(codes, dtype=np.int32)[idx].reshape(n_layers, n_experts)


def allocation_totals(codes_LxE, cost_LxExC, bytes_LxExC, choices: Sequence[int]) -> tuple[float, int]:
  """Total cost and bytes of an allocation under a cost and byte table.

  Args:
    codes_LxE: [L, E] codes, each one of `choices`.
    cost_LxExC: [L, E, C] costs.
    bytes_LxExC: [L, E, C] bytes.
    choices: C codes, the code of each choice index.

  Returns:
    (total cost, total bytes).
  """
  codes = formats.validate_codes(codes_LxE)
  cost = np.asarray(cost_LxExC, dtype=np.float64)
  nbytes = np.asarray(bytes_LxExC)
  if cost.shape != nbytes.shape or cost.shape[:2] != codes.shape:
    raise ValueError(
        f"codes_LxE {codes.shape}, cost_LxExC {cost.shape} and bytes_LxExC {nbytes.shape} must agree on"
        " [L, E] and the tables on C")
  lookup = {int(c): i for i, c in enumerate(formats.validate_codes(np.asarray(choices)).ravel())}
  unknown = sorted(set(int(c) for c in np.unique(codes)) - set(lookup))
  if unknown:
    raise ValueError(f"codes {unknown} are not among choices {list(lookup)}")
  idx = np.zeros(codes.shape, dtype=np.int64)
  for code, i in lookup.items():
    idx[codes == code] = i
  picked_cost = np.take_along_axis(cost, idx[..., None], axis=2)
  picked_bytes = np.take_along_axis(nbytes.astype(np.int64), idx[..., None], axis=2)
  return float(np.sum(picked_cost)), int(np.sum(picked_bytes))
