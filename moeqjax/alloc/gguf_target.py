"""The GGUF runtime target: codes per (layer, projection) over the ggml types that hold our grids exactly, in GGUF bytes."""

# llama.cpp stores a layer's stacked experts as three tensors (ffn_gate_exps, ffn_up_exps,
# ffn_down_exps) with ONE ggml type each, so a code per expert is widened at export to the
# container of the layer's widest code. This target allocates one type per (layer, projection)
# instead, over the types that hold our quantizer's output bit for bit:
#   ternary (code 1) -> TQ2_0 (ternary_packing "2bit") or TQ1_0 ("base3"): levels {-1, 0, 1} times
#                       one fp16 scale per block of 256 weights of a row;
#   int4 (code 4)    -> Q4_0: levels -8..7 (our full symmetric int4 grid) times an fp16 d per 32;
#   int8 (code 8)    -> Q8_0: int8 levels times an fp16 d per 32;
#   fp (code 0)      -> F16: the unquantized projection at 2 bytes per weight (export it with
#                       --fp-dtype f16; it is the weight rounded to float16, not bit-exact).
# int2/int3 have no ggml type of their own: Q4_0 would hold them at int4's bytes with more error.
# A block type is exact only where each of its blocks lies inside one of our scale groups: ggml
# rows run along a weight's INPUT dim, so the row length (D for w_gate/w_in, F for w_out) must be a
# multiple of the block, and with granularity "group" the group size too ("channel" and "tensor"
# scales are constant along a row). Scales must be fp16 (quant.scale_bytes=2) and grids symmetric.
# A type that is not exact for a projection is left out for it, and the allocation says so.
# Bytes are counted as the GGUF file stores them (gguf_blocks.BLOCKS = gguf.GGML_QUANT_SIZES:
# TQ1_0 54 / 256 weights, TQ2_0 66 / 256, Q4_0 18 / 32, Q8_0 34 / 32; F16 2 per weight).

from __future__ import annotations

import math

import numpy as np

from moeqjax import alloc
from moeqjax.alloc.allocation import (Allocation, AllocationError, expert_stats, lambda_weight,
                                      projection_error_table)
from moeqjax.convert import gguf_blocks
from moeqjax.convert.gguf_container import ORDER_2BIT, ORDER_BASE3
from moeqjax.model.projection_codes import PROJECTIONS, by_projection
from moeqjax.quant import formats, memory

TARGETS = ("experts", "gguf")  # `allocate --target`: a code per expert, or per GGUF tensor
GGUF_METHODS = ("exact", "mc_moe")  # the solvers; rule-based orders rank experts, not tensors
GGUF_CHOICES = (1, 4, 8, 0)  # ternary, Q4_0, Q8_0, F16
GGUF_UNITS = ("bits", "bytes")
F16 = "F16"
F16_BYTES = 2
# The ggml type of each code (ternary's depends on the packing: ternary_type).
_INT_TYPES = {4: "Q4_0", 8: "Q8_0", formats.FP: F16}


def projection_shapes(cfg) -> dict:
  """One expert's [in, out] shape per projection; `in` is the length of a ggml row."""
  d, f = cfg.d_model, cfg.d_ff
  return {"w_gate": (d, f), "w_in": (d, f), "w_out": (f, d)}


def ternary_type(spec) -> str:
  """The ggml type the GGUF export stores all-ternary tensors in: the packing's own."""
  return (ORDER_BASE3 if spec.ternary_packing == "base3" else ORDER_2BIT)[0]


def code_type(code: int, spec) -> str:
  """The ggml type that holds `code` exactly (GGUF_CHOICES only)."""
  code = int(code)
  if code == formats.TERNARY:
    return ternary_type(spec)
  if code not in _INT_TYPES:
    raise ValueError(f"code {code} ({formats.code_name(code)}) has no exact ggml type of its own; "
                     f"choose among {','.join(map(str, GGUF_CHOICES))} (1 = ternary, 4 = Q4_0, "
                     "8 = Q8_0, 0 = F16)")
  return _INT_TYPES[code]


def check_spec(spec):
  """Refuses a QuantSpec no ggml block type can hold exactly (one line, with the fix)."""
  if spec.scale_bytes != 2:
    raise AllocationError(f"--target gguf needs fp16 scales (ggml blocks store fp16 d): set "
                      f"quant.scale_bytes=2 (it is {spec.scale_bytes})")
  if not spec.symmetric:
    raise AllocationError("--target gguf needs symmetric grids (Q4_0/Q8_0 hold levels times d, no "
                      "zero point): set quant.symmetric=True")


def unavailable(qtype: str, n_in: int, spec) -> str | None:
  """Why `qtype` cannot hold our grid exactly for rows of `n_in` weights, or None when it can."""
  if qtype == F16:
    return None
  block = gguf_blocks.BLOCKS[qtype][0]
  if n_in % block:
    return f"rows of {n_in} input weights are not a multiple of its block of {block}"
  if spec.granularity == "group" and spec.group_size % block:
    return (f"quant.group_size={spec.group_size} puts two scales in one of its blocks of {block} "
            "(use a multiple of it, or granularity channel)")
  return None


def tensor_bytes(qtype: str, shape, num_experts: int) -> int:
  """Bytes of one stacked expert tensor [E, in, out] at `qtype`, as the GGUF file stores it."""
  n_in, n_out = shape
  if qtype == F16:
    return F16_BYTES * num_experts * n_in * n_out
  block, nbytes = gguf_blocks.BLOCKS[qtype]
  if n_in % block:
    raise ValueError(f"rows of {n_in} weights do not divide into {qtype} blocks of {block}")
  return num_experts * n_out * (n_in // block) * nbytes


def export_type(codes_E, n_in: int, spec) -> str | None:
  """The ggml type moeqjax's GGUF export stores a tensor with these expert codes in (None: no
  exact type, the export refuses it), mirroring gguf_export: all fp -> F16 at --fp-dtype f16,
  some fp -> F32, all ternary -> the ternary type when exact, else the narrowest of Q4_0 / Q8_0
  that is exact and holds the widest code."""
  codes = np.unique(np.asarray(codes_E))
  if np.all(codes == formats.FP):
    return F16
  if np.any(codes == formats.FP):
    return "F32"
  tq = ternary_type(spec)
  if np.all(codes == formats.TERNARY) and unavailable(tq, n_in, spec) is None:
    return tq
  for qtype in ("Q4_0", "Q8_0"):
    if (qtype == "Q8_0" or codes.max() <= 4) and unavailable(qtype, n_in, spec) is None:
      return qtype
  return None


def gguf_expert_bytes(cfg, codes) -> dict:
  """The GGUF bytes of all expert tensors of codes [L, E] or [L, 3, E] as the export stores them
  (mixed codes widened to the widest one's container).

  Returns:
    {"bytes", "bits_per_weight", "types": [L][3] ggml type names (PROJECTIONS order)}.

  Raises:
    ValueError: a tensor the export cannot store exactly.
  """
  spec, shapes = cfg.quant.spec(), projection_shapes(cfg)
  per = by_projection(formats.validate_codes(codes))
  total, types = 0, []
  for l in range(cfg.num_layers):
    row = []
    for name in PROJECTIONS:
      qtype = export_type(per[name][l], shapes[name][0], spec)
      if qtype is None:
        raise ValueError(f"layer {l} {name}: no exact ggml type holds its codes")
      size = 4 if qtype == "F32" else None
      total += (size * cfg.num_experts * math.prod(shapes[name]) if size
                else tensor_bytes(qtype, shapes[name], cfg.num_experts))
      row.append(qtype)
    types.append(row)
  n = alloc.num_expert_weights(shapes, cfg.num_layers, cfg.num_experts)
  return {"bytes": int(total), "bits_per_weight": 8.0 * total / n, "types": types}


def bytes_table(cfg, choices) -> np.ndarray:
  """[L, 3, C] GGUF bytes of each (layer, projection) tensor at each choice's type (PROJECTIONS
  order; an inexact type counts its bytes as if it were exact, cost_mask forbids it)."""
  spec, shapes = cfg.quant.spec(), projection_shapes(cfg)
  out = np.zeros((cfg.num_layers, len(PROJECTIONS), len(choices)), np.int64)
  for p, name in enumerate(PROJECTIONS):
    for c, code in enumerate(choices):
      qtype = code_type(code, spec)
      if unavailable(qtype, shapes[name][0], spec) is None:
        out[:, p, c] = tensor_bytes(qtype, shapes[name], cfg.num_experts)
  return out


def availability(cfg, choices) -> tuple[np.ndarray, dict]:
  """([3, C] bool: the type of choice c is exact for projection p, {projection: {type: why not}})."""
  spec, shapes = cfg.quant.spec(), projection_shapes(cfg)
  ok = np.ones((len(PROJECTIONS), len(choices)), bool)
  why = {}
  for p, name in enumerate(PROJECTIONS):
    for c, code in enumerate(choices):
      qtype = code_type(code, spec)
      reason = unavailable(qtype, shapes[name][0], spec)
      if reason is not None:
        ok[p, c] = False
        why.setdefault(name, {})[qtype] = reason
  return ok, why


def cheapest_bytes(table_Lx3xC, ok_3xC) -> int:
  """GGUF expert bytes with every (layer, projection) at its cheapest exact choice (bytes_table,
  availability): the least any allocation over those choices can take."""
  return int(np.where(ok_3xC[None], table_Lx3xC, np.iinfo(np.int64).max).min(axis=2).sum())


def projection_cost(importance_LxE, err_LxEx3xC) -> np.ndarray:
  """[L, 3, C] cost of a (layer, projection) tensor at each choice.

  cost[l, p, c] = sum_e importance[l, e] * err[l, e, p, c] / 3. The per-expert solvers minimise
  sum_e importance[l, e] * (mean over the three projections of err[l, e, p, c]); splitting that
  mean gives one term per (layer, projection), so with one type per tensor the same objective is
  minimised exactly by the same multiple-choice knapsack, whose items are now the tensors.
  """
  imp = np.asarray(importance_LxE, np.float64)
  err = np.asarray(err_LxEx3xC, np.float64)
  weighted = np.where(np.isinf(err), np.inf, imp[:, :, None, None] * np.where(np.isinf(err), 0, err))
  return weighted.sum(axis=1) / err.shape[2]


def expand(codes_Lx3, num_experts: int) -> np.ndarray:
  """[L, 3] codes (one per tensor) as per-projection expert codes [L, 3, E]."""
  codes = np.asarray(codes_Lx3, np.int32)
  return np.repeat(codes[:, :, None], num_experts, axis=2)


def achieved(cfg, codes_Lx3xE) -> dict:
  """GGUF bytes and bits of a per-projection allocation, beside moeqjax's own packed bytes."""
  g = gguf_expert_bytes(cfg, codes_Lx3xE)
  mem = memory.expert_bytes(projection_shapes(cfg), by_projection(codes_Lx3xE), cfg.quant.spec())
  return {"bytes": g["bytes"], "bits_per_weight": g["bits_per_weight"],
          "code_bits": mem["avg_code_bits"], "moeqjax_bytes": mem["total_bytes"]}


def allocate_gguf(method: str, cfg, params, stats: dict, budget_value: float, budget_unit: str, *,
                  choices=GGUF_CHOICES, err=None) -> Allocation:
  """One ggml type per (layer, projection) within a GGUF byte budget, by a per-expert solver.

  Args:
    method: "exact" (importance = the rank weight of Lambda) or "mc_moe" (frequency^1 x mean
      gate^1.5), the per-expert solvers' sensitivity signals (see projection_cost).
    cfg: the ModelConfig.
    params: model params (router for Lambda, the experts for the errors).
    stats: the train state's router statistics.
    budget_value, budget_unit: "bits" per expert weight with the block scales, or GGUF "bytes".
    choices: codes among GGUF_CHOICES (1 ternary, 4 Q4_0, 8 Q8_0, 0 F16).
    err: precomputed projection_error_table(params, cfg, choices).

  Returns:
    The Allocation: target "gguf", codes [L, 3, E] (every expert of a tensor at its type's code),
    achieved GGUF bytes never above the budget, and `extra` with the types per (layer,
    projection) and the types left out per projection with the reason.

  Raises:
    AllocationError: a method, unit, choice or QuantSpec the target cannot use, or a budget below
      the cheapest exact types.
  """
  if method not in GGUF_METHODS:
    raise AllocationError(f"--target gguf allocates whole tensors with a solver: use --method "
                          f"{' or '.join(GGUF_METHODS)} (rule-based methods order experts, and a "
                          f"GGUF tensor holds all of them), not {method}")
  if budget_unit not in GGUF_UNITS:
    raise AllocationError(f"--target gguf counts GGUF bytes, block scales included: use "
                          f"--budget-unit bits or bytes, not {budget_unit}")
  if not (np.isfinite(budget_value) and budget_value > 0):
    raise AllocationError(f"budget {budget_value} must be a positive number")
  spec = cfg.quant.spec()
  check_spec(spec)
  try:
    choices = tuple(int(c) for c in choices)
    types = [code_type(c, spec) for c in choices]
  except (TypeError, ValueError) as e:
    raise AllocationError(f"--target gguf choices {choices}: {e}") from None
  if not choices or len(set(choices)) != len(choices):
    raise AllocationError(f"--target gguf choices {choices}: give each of "
                          f"{','.join(map(str, GGUF_CHOICES))} at most once")
  shapes = projection_shapes(cfg)
  n = alloc.num_expert_weights(shapes, cfg.num_layers, cfg.num_experts)
  budget = (int(math.floor(budget_value)) if budget_unit == "bytes"
            else alloc.budget_from_bits(budget_value, n))
  ok, why = availability(cfg, choices)
  left_out = [f"{name}: {qtype} left out ({reason})" for name, r in why.items()
              for qtype, reason in r.items()]
  for p, name in enumerate(PROJECTIONS):
    if not ok[p].any():
      raise AllocationError(f"--target gguf: no choice is exact for {name} ({'; '.join(left_out)})"
                            "; add 0 (F16) to the choices")
  table = bytes_table(cfg, choices)
  cheapest = cheapest_bytes(table, ok)
  if budget < cheapest:
    raise AllocationError(
        f"budget {budget_value:g} {budget_unit} ({budget} bytes) is infeasible for --target gguf: "
        f"the cheapest exact types already take {cheapest} bytes "
        f"({8 * cheapest / n:.4g} bits per expert weight with block scales); raise the budget")
  s = expert_stats(params, stats, cfg.num_layers)
  if method == "exact":
    importance = lambda_weight(s["lambda"])
    signal = "rank weight of Lambda ((E - rank)/E, most sensitive = 1)"
  else:
    importance = alloc.mc_moe_importance(s["count"], s["mean_gate"])
    signal = "frequency^1 x mean gate^1.5 (MC-MoE importance)"
  err = projection_error_table(params, cfg, choices) if err is None else err
  cost = np.where(ok[None], projection_cost(importance, err), np.inf)
  codes_Lx3 = alloc.solve_exact(cost, table, budget, choices)
  codes = expand(codes_Lx3, cfg.num_experts)
  result = achieved(cfg, codes)
  if result["bytes"] > budget:
    raise AssertionError(f"gguf {method} exceeded its budget: {result['bytes']} > {budget}")
  note = (f"gguf {method}: one ggml type per (layer, projection) tensor, multiple-choice knapsack "
          f"over {', '.join(dict.fromkeys(types))} in GGUF bytes (block scales included); cost = "
          f"sum over the tensor's experts of {signal} x relative weight MSE of the projection")
  if left_out:
    note += "; not exact, so not allocated: " + "; ".join(left_out)
  extra = {
      "gguf_types": {str(l): {name: code_type(codes_Lx3[l, p], spec)
                              for p, name in enumerate(PROJECTIONS)}
                     for l in range(cfg.num_layers)},
      "gguf_left_out": why,
      "gguf_requires": {"scale_bytes": 2, "symmetric": True,
                        "rows": {name: shapes[name][0] for name in PROJECTIONS},
                        "granularity": spec.granularity,
                        "group_size": spec.group_size if spec.granularity == "group" else None},
  }
  return Allocation(method, codes, float(budget_value), budget_unit, budget, result, note,
                    target="gguf", extra=extra)


def check_exact(cfg, codes_Lx3xE, where: str):
  """Refuses per-projection codes that this model's quant config would not store exactly in GGUF
  (e.g. an allocation.json made under another group size); one line naming the first tensor."""
  spec, shapes = cfg.quant.spec(), projection_shapes(cfg)
  check_spec(spec)
  per = by_projection(codes_Lx3xE)
  for l in range(cfg.num_layers):
    for name in PROJECTIONS:
      codes = np.unique(per[name][l])
      if codes.size != 1:
        raise AllocationError(f"{where}: layer {l} {name} mixes codes {codes.tolist()}; a GGUF "
                              "tensor holds one type (re-run `moeqjax allocate --target gguf`)")
      try:
        qtype = code_type(codes[0], spec)
      except ValueError as e:
        raise AllocationError(f"{where}: layer {l} {name}: {e}") from None
      reason = unavailable(qtype, shapes[name][0], spec)
      if reason is not None:
        raise AllocationError(f"{where}: layer {l} {name} is allocated {qtype}, which this run's "
                              f"quant config does not hold exactly ({reason}); allocate with the "
                              "quant config you train with")
