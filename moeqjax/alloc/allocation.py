"""Per-expert bit allocation from a train state's router statistics, under a byte budget, to/from allocation.json."""

# Budgets are always enforced in true bytes (quant.memory accounting, scales included), so every method
# is compared at equal (or, for the exact solvers, at most equal) expert weight bytes.
#
# Units of a budget value:
#   "bits"      average bits per expert weight, scales and zero points included (alloc.budget_from_bits);
#   "code_bits" average stored bits per expert weight, scales and zero points excluded (the paper's
#               "bits"); the per-expert overhead of an intN expert (scales, and zero points for asymmetric
#               specs) is added on top, so b code bits always hold uniform intb;
#   "bytes"     total expert weight bytes.
#
# Rule-based methods (RULE_METHODS; the user-facing text is alloc.rules.rule_bytes_text) apply the
# paper's two-level rule in bytes: per layer, with the layer's share B_layer of the budget,
# n_high = floor((B_layer - E*bytes_lo) / (bytes_hi - bytes_lo)) experts (the first in the method's
# order, clipped to [0, E]) get the high level, the rest the low one.
# The levels are the user's (bh, bl) when given (METHODS.md's levels, e.g. 3,1), else the two choices
# whose all-expert bytes bracket B_layer. floor (not round) means it never overshoots, and every
# rule-based method of one budget has exactly the same bytes. When two choices cost the same bytes
# (ternary and int2 under "2bit" ternary packing), the one with the lower mean relative weight error in
# that layer stands for both (uniform: over all layers), so a byte tie never hides ternary.

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import jax
import numpy as np

from moeqjax import alloc
from moeqjax.alloc.rules import RULE_METHODS
from moeqjax.model.projection_codes import PROJECTIONS
from moeqjax.quant import formats, memory, quantize_dequantize
from moeqjax.quant.clip import learned_ratio

METHODS = ("paper_combined", "paper_router", "paper_router_reversed", "router_norm", "exact",
           "frequency", "gate_weight", "mc_moe", "uniform", "random")
BUDGET_UNITS = ("bits", "code_bits", "bytes")
DEFAULT_CHOICES = (1, 2, 3, 4, 8)
ZETA = 3.0  # the paper's promotion ratio in the combined order
_EXPERT_PARAMS = ("w_in", "w_gate", "w_out")


class AllocationError(ValueError):
  """An infeasible budget or an unusable allocation; the message says how to fix it.

  A user error like the pipeline's ConfigError (the CLI prints both as one line), but the library
  cannot derive from the pipeline's class.
  """


def expert_shapes(cfg) -> dict:
  """One expert's [in, out] weight shapes: w_in, w_gate, w_out (ReLU experts, e.g. Switch's
  sparse layers seen as a ModelConfig with expert_act="relu", have no w_gate)."""
  d, f = cfg.d_model, cfg.d_ff
  shapes = {"w_in": (d, f), "w_gate": (d, f), "w_out": (f, d)}
  if getattr(cfg, "expert_act", "swiglu") != "swiglu":
    del shapes["w_gate"]
  return shapes


def _overhead_bytes_per_expert(cfg) -> int:
  """Bytes one intN expert spends beside its codes: scales, plus zero points for asymmetric specs.

  int8 packs exactly one byte per weight, so its bytes beyond the weight count are the overhead of
  the same memory accounting that the report uses. Ternary stores no zero points: at most this much.
  """
  spec = cfg.quant.spec()
  return sum(memory.weight_bytes(s, 8, spec) - math.prod(s) for s in expert_shapes(cfg).values())


def budget_bytes(cfg, value: float, unit: str) -> int:
  """A budget in `unit` as whole expert weight bytes (rounded down)."""
  if unit not in BUDGET_UNITS:
    raise AllocationError(f"budget unit {unit!r} is unknown; use one of {', '.join(BUDGET_UNITS)}")
  if not (np.isfinite(value) and value > 0):
    raise AllocationError(f"budget {value} must be a positive number")
  shapes = expert_shapes(cfg)
  n = alloc.num_expert_weights(shapes, cfg.num_layers, cfg.num_experts)
  if unit == "bytes":
    return int(math.floor(value))
  base = alloc.budget_from_bits(value, n)
  if unit == "code_bits":
    base += cfg.num_layers * cfg.num_experts * _overhead_bytes_per_expert(cfg)
  return int(base)


def bytes_table(cfg, choices=DEFAULT_CHOICES) -> np.ndarray:
  return alloc.bytes_table(expert_shapes(cfg), cfg.num_layers, cfg.num_experts, choices,
                           cfg.quant.spec())


def achieved(cfg, codes_LxE) -> dict:
  """Bytes and bits of an allocation, from the memory report's accounting."""
  mem = memory.expert_bytes(expert_shapes(cfg), np.asarray(codes_LxE), cfg.quant.spec())
  return {"bytes": mem["total_bytes"], "bits_per_weight": mem["bits_per_weight"],
          "code_bits": mem["avg_code_bits"]}


def expert_stats(params, stats: dict, num_layers: int) -> dict:
  """Per-layer, per-expert statistics as float64 numpy [L, E] arrays (plus `steps`).

  lambda = ||w_s(now)|| - ||w_s(start)|| (the paper's Lambda, start = the start of the run that
  collected the statistics), mean_gate = gate_sum / max(count, 1) (mean gate over routed tokens),
  neuron_variance = V_s of w_in.
  """
  stats = jax.device_get(stats)
  kernels = np.stack([np.asarray(params[f"layers_{i}"]["moe"]["router"]["kernel"])
                      for i in range(num_layers)])
  norm_now = alloc.router_row_norms(kernels)
  w_in = np.stack([np.asarray(params[f"layers_{i}"]["moe"]["w_in"])
                   for i in range(num_layers)])
  start = np.asarray(stats["router_norm_start"], np.float64)
  count = np.asarray(stats["count"], np.float64)
  return {
      "lambda": alloc.router_norm_change(start, norm_now),
      "router_norm_start": start,
      "router_norm_now": norm_now,
      "grad_norm_sum": np.asarray(stats["grad_norm_sum"], np.float64),
      "grad_norm_ema": np.asarray(stats["grad_norm_ema"], np.float64),
      "count": count,
      "gate_sum": np.asarray(stats["gate_sum"], np.float64),
      "mean_gate": np.asarray(stats["gate_sum"], np.float64) / np.maximum(count, 1.0),
      "neuron_variance": alloc.neuron_variance(w_in),
      "steps": int(np.asarray(stats["steps"])),
  }


def projection_error_table(params, cfg, choices=DEFAULT_CHOICES) -> np.ndarray:
  """[L, E, 3, C] relative quantization error of each expert's projection at each choice.

  err = ||Q(w) - w||_F^2 / ||w||_F^2 of w_gate, w_in, w_out (model.projection_codes.PROJECTIONS
  order), with Q the model's own quantize_dequantize (same granularity, ternary method and scales
  as QAT, including the effective learned clip ratios when the rules learn them and `params` holds
  them; ratio 1 otherwise). Code 0 (full precision) has error 0.
  """
  spec = cfg.quant.spec()
  out = np.zeros((cfg.num_layers, cfg.num_experts, len(PROJECTIONS), len(choices)))
  for l in range(cfg.num_layers):
    experts = params[f"layers_{l}"]["moe"]
    for c_idx, code in enumerate(choices):
      codes = np.full((cfg.num_experts,), code, np.int32)
      for p, name in enumerate(PROJECTIONS):
        if name not in experts:  # ReLU experts have no gate projection: error 0 there
          continue
        w = np.asarray(experts[name], np.float32)
        wq = np.asarray(quantize_dequantize(w, codes, spec, learned_ratio(experts, (name,), spec)))
        num = np.sum((wq - w) ** 2, axis=(1, 2))
        out[l, :, p, c_idx] = num / np.maximum(np.sum(w * w, axis=(1, 2)), 1e-30)
  return out


def quant_error_table(params, cfg, choices=DEFAULT_CHOICES) -> np.ndarray:
  """[L, E, C] relative quantization error of each expert at each choice: the mean over w_in,
  w_gate and w_out of projection_error_table's errors."""
  per = projection_error_table(params, cfg, choices)
  names = [name for name in _EXPERT_PARAMS if name in expert_shapes(cfg)]
  return np.mean([per[:, :, PROJECTIONS.index(name)] for name in names], axis=0)


def lambda_weight(lam_LxE) -> np.ndarray:
  """Sensitivity weight from Lambda: rank-based per layer, most sensitive (smallest Lambda) = 1,
  least sensitive = 1/E, linear in between: w = (E - rank) / E, rank 0 = most sensitive."""
  order = alloc.sensitivity_order(lam_LxE)
  num_experts = order.shape[1]
  rank = np.argsort(order, axis=1)
  return (num_experts - rank) / num_experts


def _levels_for(bytes_per_choice: np.ndarray, layer_budget: int, num_experts: int):
  """(lo_idx, hi_idx, n_high) of the paper's two-level rule in bytes, never above layer_budget."""
  order = np.argsort(bytes_per_choice, kind="stable")
  b = bytes_per_choice[order]
  if num_experts * b[0] > layer_budget:
    return None
  if num_experts * b[-1] <= layer_budget:
    return order[-1], order[-1], num_experts
  for i in range(len(b) - 1):
    lo, hi = b[i], b[i + 1]
    if num_experts * lo <= layer_budget < num_experts * hi:
      n_high = int((layer_budget - num_experts * lo) // (hi - lo))
      return order[i], order[i + 1], n_high
  raise AssertionError("unreachable")


def _break_byte_ties(bytes_C: np.ndarray, err_C: np.ndarray | None) -> np.ndarray:
  """Indices of the choices that stay: of several choices with equal bytes, the lowest-error one."""
  if err_C is None:
    return np.arange(bytes_C.size)
  keep = [min(np.flatnonzero(bytes_C == b), key=lambda i: (err_C[i], i))
          for b in np.unique(bytes_C)]
  return np.sort(np.asarray(keep))


def _rule(order_LxE, table_LxExC, choices, budget: int, err_LxExC=None):
  num_layers, num_experts = order_LxE.shape
  layer_budget = budget // num_layers
  codes = np.empty((num_layers, num_experts), np.int32)
  for l in range(num_layers):
    keep = _break_byte_ties(table_LxExC[l, 0],
                            None if err_LxExC is None else err_LxExC[l].mean(axis=0))
    lv = _levels_for(table_LxExC[l, 0, keep], layer_budget, num_experts)
    if lv is None:
      raise AssertionError("feasibility is checked before")
    lo, hi, n_high = lv
    codes[l] = choices[keep[lo]]
    codes[l, order_LxE[l, :n_high]] = choices[keep[hi]]
  return codes


def _has_byte_ties(table_LxExC) -> bool:
  per = table_LxExC[0, 0]
  return np.unique(per).size < per.size


def check_levels(levels, method: str) -> tuple[int, int] | None:
  """The paper's levels (bh, bl) as two codes, or None for "bracket the budget"; checked.

  Args:
    levels: None or () (bracket the budget with the choices), or two codes, high first, e.g. (3, 1).
    method: the allocation method; levels apply to RULE_METHODS only.

  Raises:
    AllocationError: not two valid codes, or levels with a method that is not rule-based.
  """
  if levels is None or len(levels) == 0:
    return None
  if method not in RULE_METHODS:
    raise AllocationError(f"levels {tuple(levels)} only apply to the rule-based methods "
                          f"({', '.join(RULE_METHODS)}), not to {method}; drop the levels")
  try:
    codes = tuple(int(c) for c in formats.validate_codes(np.asarray(levels)).ravel())
  except ValueError as e:
    raise AllocationError(f"levels {tuple(levels)}: {e}") from None
  if len(codes) != 2:
    raise AllocationError(f"levels {codes} must be two codes, high then low (bh,bl), e.g. 3,1")
  return codes


@dataclasses.dataclass
class Allocation:
  """An allocation: codes [L, E] (per expert), or [L, 3, E] (per projection, for a runtime
  target; `target` names it and `extra` holds what the target records, e.g. the ggml types)."""

  method: str
  codes_LxE: np.ndarray
  budget_value: float
  budget_unit: str
  budget_bytes: int
  achieved: dict
  note: str
  target: str = "experts"
  extra: dict = dataclasses.field(default_factory=dict)

  def to_json(self, cfg=None, sensitivity: dict | None = None) -> dict:
    codes = np.asarray(self.codes_LxE)
    out = {
        "method": self.method,
        "target": self.target,
        "budget": {"value": self.budget_value, "unit": self.budget_unit,
                   "bytes": self.budget_bytes},
        "achieved": self.achieved,
        "within_budget": bool(self.achieved["bytes"] <= self.budget_bytes),
        "note": self.note,
    }
    if codes.ndim == 3:  # per projection: layer -> projection -> expert -> code
      out["codes"] = {str(l): {name: {str(e): int(codes[l, p, e]) for e in range(codes.shape[2])}
                               for p, name in enumerate(PROJECTIONS)}
                      for l in range(codes.shape[0])}
      out["code_names"] = {str(l): {name: sorted({formats.code_name(int(c)) for c in codes[l, p]})
                                    for p, name in enumerate(PROJECTIONS)}
                           for l in range(codes.shape[0])}
    else:
      out["codes"] = {str(l): {str(e): int(codes[l, e]) for e in range(codes.shape[1])}
                      for l in range(codes.shape[0])}
      out["code_names"] = {str(l): {str(e): formats.code_name(int(codes[l, e]))
                                    for e in range(codes.shape[1])} for l in range(codes.shape[0])}
    out["codes_LxE"] = codes.tolist()
    out.update(self.extra)
    if sensitivity is not None:
      out["sensitivity"] = sensitivity
    return out


EXPERT_CODES = (1, 2, 3, 4, 8)  # what an expert can be: ternary or intN (never full precision)


def check_choices(choices) -> tuple[int, ...]:
  """The candidate codes as ints, each an expert code and none twice, else an AllocationError."""
  try:
    choices = tuple(int(c) for c in choices)
  except (TypeError, ValueError):
    raise AllocationError(f"choices {choices!r} must be integer codes, e.g. 1,2,3,4,8") from None
  bad = [c for c in choices if c not in EXPERT_CODES]
  if bad or not choices or len(set(choices)) != len(choices):
    what = (f"code {bad[0]} is not an expert code" if bad else
            "no codes given" if not choices else "a code is given twice")
    raise AllocationError(f"choices {','.join(map(str, choices))}: {what}; choose among "
                          f"{','.join(map(str, EXPERT_CODES))} (1 = ternary, 2/3/4/8 = intN)")
  return choices


def allocate(method: str, cfg, params, stats: dict, budget_value: float, budget_unit: str, *,
             choices=None, seed: int = 0, err_LxExC: np.ndarray | None = None,
             levels=None, target: str = "experts") -> Allocation:
  """Allocates expert codes with `method` within the budget.

  With target "gguf" the codes are per (layer, projection) over the ggml types llama.cpp holds
  exactly, in GGUF bytes: see moeqjax.alloc.gguf_target.allocate_gguf (choices default to its
  GGUF_CHOICES; seed, levels and err_LxExC do not apply).

  Args:
    method: one of METHODS.
    cfg: the ModelConfig.
    params: model params (router, w_in for V_s and the quantization errors).
    stats: the train state's router statistics (`state.stats`).
    budget_value, budget_unit: the budget, see the module comment.
    choices: candidate codes (1 = ternary, 2/3/4/8 = intN); None: DEFAULT_CHOICES.
    seed: for "random".
    err_LxExC: precomputed quant_error_table(params, cfg, choices) (saves time in loops).
    levels: for RULE_METHODS only: the paper's levels (bh, bl), e.g. (3, 1), instead of the two
      choices that bracket the budget; None or () brackets.

  Returns:
    The Allocation; its achieved bytes never exceed the budget.

  Raises:
    AllocationError: unknown method, bad levels, or a budget below every expert at the cheapest
      choice (at the low level when levels are given).
  """
  if target == "gguf":
    from moeqjax.alloc import gguf_target  # it builds on this module
    if levels:
      raise AllocationError("--levels apply to the per-expert rule-based methods, not to "
                            "--target gguf; drop them")
    return gguf_target.allocate_gguf(
        method, cfg, params, stats, budget_value, budget_unit,
        choices=gguf_target.GGUF_CHOICES if choices is None else choices)
  if target != "experts":
    raise AllocationError(f"allocation target {target!r} is unknown; use experts or gguf")
  if method not in METHODS:
    raise AllocationError(f"allocation method {method!r} is unknown; use one of {', '.join(METHODS)}")
  levels = check_levels(levels, method)
  choices = check_choices(DEFAULT_CHOICES if choices is None else choices)
  budget = budget_bytes(cfg, budget_value, budget_unit)
  table = bytes_table(cfg, choices)
  num_layers, num_experts = cfg.num_layers, cfg.num_experts
  if levels is not None:
    level_table = bytes_table(cfg, levels[::-1])  # [..., (low, high)]
    if level_table[0, 0, 1] <= level_table[0, 0, 0]:
      raise AllocationError(
          f"levels {levels[0]},{levels[1]}: the high level {formats.code_name(levels[0])} must take "
          f"more bytes than the low level {formats.code_name(levels[1])} ({level_table[0, 0, 1]} vs "
          f"{level_table[0, 0, 0]} per expert); pass bh,bl, e.g. 3,1")
  lo = levels[1] if levels is not None else choices[int(np.argmin(table[0, 0]))]
  cheapest = int(bytes_table(cfg, (lo,)).sum())
  if budget < cheapest:
    raise AllocationError(
        f"budget {budget_value:g} {budget_unit} ({budget} bytes) is infeasible: every expert at "
        f"{formats.code_name(lo)} already takes {cheapest} bytes "
        f"({achieved(cfg, np.full((num_layers, num_experts), lo))['code_bits']:.3g} code bits, "
        f"{8 * cheapest / alloc.num_expert_weights(expert_shapes(cfg), num_layers, num_experts):.3g}"
        " bits per weight with scales); raise the budget")
  s = expert_stats(params, stats, num_layers)
  # The solvers weigh errors; the rules and uniform need them only to break byte ties.
  ties = levels is None and _has_byte_ties(table)
  if err_LxExC is None and (method in ("exact", "mc_moe") or ties):
    err_LxExC = quant_error_table(params, cfg, choices)
  note = ""
  if method == "uniform":
    per = table[0, 0]
    keep = _break_byte_ties(per, None if err_LxExC is None else err_LxExC.mean(axis=(0, 1)))
    fits = [i for i in keep if per[i] * num_layers * num_experts <= budget]
    best = max(fits, key=lambda i: per[i])
    codes = alloc.uniform(num_layers, num_experts, choices[best])
    note = ("uniform: the largest single code within the budget (fewer bytes than the budget; of "
            "codes with equal bytes, the lower weight error)")
  elif method in ("exact", "mc_moe"):
    err = err_LxExC
    if method == "exact":
      cost = lambda_weight(s["lambda"])[..., None] * err
      codes = alloc.solve_exact(cost, table, budget, choices)
      note = ("exact: multiple-choice knapsack, cost = rank weight of Lambda ((E - rank)/E, most "
              "sensitive = 1) x relative weight MSE of the expert at the choice")
    else:
      codes = alloc.mc_moe(s["count"], s["mean_gate"], err, table, budget, choices)
      note = "mc_moe: frequency^1 x mean gate^1.5 x relative weight MSE, exact integer program"
  else:
    if method == "paper_combined":
      order = alloc.combined_order_layers(s["lambda"], s["neuron_variance"], ZETA)
    elif method == "paper_router":
      order = alloc.sensitivity_order(s["lambda"])
    elif method == "paper_router_reversed":
      # The same rule with the direction flipped: the experts whose router norm grew MOST first.
      order = alloc.sensitivity_order(-s["lambda"])
    elif method == "router_norm":
      # The paper's Lambda where no starting router exists (a released checkpoint): ||w_s(T)||.
      order = alloc.sensitivity_order(alloc.router_norm_change(None, s["router_norm_now"]))
    elif method == "frequency":
      order = np.argsort(-s["count"], axis=1, kind="stable")
    elif method == "gate_weight":
      order = np.argsort(-s["mean_gate"], axis=1, kind="stable")
    else:  # random
      rng = np.random.default_rng(seed)
      order = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])
    if levels is None:
      codes = _rule(order, table, choices, budget, err_LxExC)
      how = "levels bracket the budget, equal-byte codes by lower error"
    else:
      codes = _rule(order, level_table, levels[::-1], budget)
      how = f"levels {levels[0]},{levels[1]}"
    note = (f"{method}: paper two-level rule in bytes ({how}; n_high rounded down, so the rule "
            "never exceeds the budget)")
  codes = np.asarray(codes, np.int32)
  result = Allocation(method, codes, float(budget_value), budget_unit, budget,
                      achieved(cfg, codes), note)
  if result.achieved["bytes"] > budget:
    raise AssertionError(f"{method} exceeded its budget: {result.achieved['bytes']} > {budget}")
  return result


def write_allocation(path, allocation: Allocation, sensitivity: dict | None = None) -> dict:
  record = allocation.to_json(sensitivity=sensitivity)
  pathlib.Path(path).write_text(json.dumps(record, indent=2) + "\n")
  return record


def read_allocation(path, num_layers: int, num_experts: int) -> np.ndarray:
  """codes [L, E], or [L, 3, E] for a per-projection allocation (`--target gguf`), from an
  allocation.json (the `codes` layer -> expert -> code, or layer -> projection -> expert -> code,
  mapping).

  The table must be for exactly this model: L layers of E experts each (no fewer, no more).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise AllocationError(f"allocation file {path} does not exist; write one with `moeqjax allocate`")
  fix = "write it with `moeqjax allocate` for this model"
  try:
    record = json.loads(path.read_text())
    table = record["codes"]
    per_projection = any(isinstance(row.get("0", row.get(PROJECTIONS[0])), dict)
                         for row in table.values())
    if per_projection:
      if any(sorted(row) != sorted(PROJECTIONS) for row in table.values()):
        raise KeyError(f"each layer needs the projections {', '.join(PROJECTIONS)}")
      rows = [row[name] for row in table.values() for name in PROJECTIONS]
    else:
      rows = list(table.values())
    shape = (len(table), *sorted({len(row) for row in rows}))
    if per_projection:
      codes = np.array([[[int(table[str(l)][name][str(e)]) for e in range(num_experts)]
                         for name in PROJECTIONS] for l in range(num_layers)], np.int32)
    else:
      codes = np.array([[int(table[str(l)][str(e)]) for e in range(num_experts)]
                        for l in range(num_layers)], np.int32)
  except (KeyError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
    raise AllocationError(
        f"{path} is not an allocation for {num_layers} layers x {num_experts} experts ({e!r}); "
        f"{fix}") from None
  if shape != (num_layers, num_experts):
    found = f"{shape[0]} layers x " + "/".join(str(n) for n in shape[1:]) + " experts"
    raise AllocationError(f"{path} allocates {found}, but the model has {num_layers} layers x "
                          f"{num_experts} experts; {fix}")
  try:
    formats.validate_codes(codes)
  except ValueError as e:
    raise AllocationError(f"{path}: {e}") from None
  return codes


def allocation_target(path) -> str:
  """The runtime target an allocation.json was made for: "experts" (also for files without one)
  or "gguf"."""
  try:
    return str(json.loads(pathlib.Path(path).read_text()).get("target", "experts"))
  except (OSError, ValueError, AttributeError):
    return "experts"
