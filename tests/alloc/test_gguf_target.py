"""`allocate --target gguf`: one exact ggml type per (layer, projection) in GGUF bytes, by the per-expert solvers."""

import itertools
import json

import jax
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.alloc import allocation as alloc_mod
from moeqjax.alloc import gguf_target as gt
from moeqjax.model import QuantRules, init_model
from moeqjax.model.projection_codes import PROJECTIONS
from moeqjax.train import init_router_stats

# w_gate / w_in rows are D = 256 (TQ2_0 fits), w_out rows F = 96 (only 32-blocks fit): ternary
# is left out for w_out, and the allocation must say so.
D, F, E, L = 256, 96, 2, 2


def _setup(**rules):
  base = dict(expert_code=1, granularity="channel")
  base.update(rules)
  cfg = tiny_model_config(d_model=D, d_ff=F, num_experts=E, num_layers=L, num_heads=2,
                          head_dim=8, quant=QuantRules(**base))
  _, params, _ = init_model(cfg, jax.random.key(0))
  params = jax.device_get(params)
  stats = jax.device_get(init_router_stats(params, cfg.num_layers))
  r = np.random.default_rng(0)
  stats["count"] = r.integers(1, 50, (L, E)).astype(np.float32)
  stats["gate_sum"] = stats["count"] * r.uniform(0.2, 0.9, (L, E)).astype(np.float32)
  return cfg, params, stats


def test_block_bytes_are_ggufs_own():
  gguf = pytest.importorskip("gguf", reason="needs the `export` extra (gguf)")
  want = {"TQ1_0": (256, 54), "TQ2_0": (256, 66), "Q4_0": (32, 18), "Q8_0": (32, 34)}
  for qtype, (block, nbytes) in want.items():
    assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]) == (block, nbytes)
    assert gt.tensor_bytes(qtype, (512, 3), 2) == 2 * 3 * (512 // block) * nbytes
  assert tuple(gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.F16]) == (1, gt.F16_BYTES)
  assert gt.tensor_bytes(gt.F16, (96, 5), 2) == 2 * 96 * 5 * 2


def test_exactness_follows_rows_groups_and_packing():
  spec = QuantRules(granularity="channel").spec()
  assert gt.unavailable("TQ2_0", 256, spec) is None and gt.unavailable("Q4_0", 96, spec) is None
  assert "not a multiple of its block of 256" in gt.unavailable("TQ2_0", 384, spec)
  g128 = QuantRules(granularity="group", group_size=128).spec()
  assert "group_size=128" in gt.unavailable("TQ2_0", 512, g128)
  assert gt.unavailable("Q8_0", 512, g128) is None
  assert gt.unavailable("Q4_0", 512, QuantRules(granularity="group", group_size=16).spec())
  assert gt.ternary_type(spec) == "TQ2_0"
  assert gt.ternary_type(QuantRules(ternary_packing="base3").spec()) == "TQ1_0"


def test_projection_cost_splits_the_per_expert_objective():
  """With one code for all three projections, the per-tensor costs add up to the per-expert
  solver's cost (rank weight of Lambda x mean relative error), so it is the same objective."""
  cfg, params, stats = _setup()
  choices = (1, 4, 8)
  s = alloc_mod.expert_stats(params, stats, L)
  w = alloc_mod.lambda_weight(s["lambda"])
  per_expert = w[..., None] * alloc_mod.quant_error_table(params, cfg, choices)  # [L, E, C]
  per_tensor = gt.projection_cost(w, alloc_mod.projection_error_table(params, cfg, choices))
  np.testing.assert_allclose(per_tensor.sum(axis=1), per_expert.sum(axis=1), rtol=1e-12)


@pytest.mark.parametrize("method", gt.GGUF_METHODS)
@pytest.mark.parametrize("bits", [3.0, 5.5])
def test_allocation_is_optimal_exact_and_within_budget(method, bits):
  cfg, params, stats = _setup()
  a = alloc_mod.allocate(method, cfg, params, stats, bits, "bits", target="gguf")
  codes = np.asarray(a.codes_LxE)
  assert a.target == "gguf" and codes.shape == (L, 3, E)
  assert np.all(codes == codes[:, :, :1])  # one type per tensor
  assert not np.any(codes[:, PROJECTIONS.index("w_out")] == 1)  # no TQ for rows of 96
  assert a.extra["gguf_left_out"] == {"w_out": {"TQ2_0": "rows of 96 input weights are not a "
                                                "multiple of its block of 256"}}
  assert "w_out: TQ2_0 left out" in a.note
  shapes = gt.projection_shapes(cfg)
  want_bytes = sum(gt.tensor_bytes(gt.code_type(codes[l, p, 0], cfg.quant.spec()), shapes[name], E)
                   for l in range(L) for p, name in enumerate(PROJECTIONS))
  assert a.achieved["bytes"] == want_bytes <= a.budget_bytes
  assert a.budget_bytes == int(bits * L * E * (2 * D * F + F * D) / 8)
  assert a.extra["gguf_types"]["0"]["w_out"] == gt.code_type(codes[0, 2, 0], cfg.quant.spec())
  # Brute force over every type per tensor: the solver's choice is the cheapest within budget.
  choices = gt.GGUF_CHOICES
  s = alloc_mod.expert_stats(params, stats, L)
  imp = (alloc_mod.lambda_weight(s["lambda"]) if method == "exact"
         else alloc_mod.alloc.mc_moe_importance(s["count"], s["mean_gate"]))
  ok, _ = gt.availability(cfg, choices)
  cost = np.where(ok[None], gt.projection_cost(
      imp, alloc_mod.projection_error_table(params, cfg, choices)), np.inf)
  table = gt.bytes_table(cfg, choices)
  best = min(
      (sum(cost[l, p, c] for (l, p), c in zip(itertools.product(range(L), range(3)), pick)), pick)
      for pick in itertools.product(range(len(choices)), repeat=L * 3)
      if sum(table[l, p, c] for (l, p), c in zip(itertools.product(range(L), range(3)), pick))
      <= a.budget_bytes)
  got = sum(cost[l, p, choices.index(codes[l, p, 0])] for l in range(L) for p in range(3))
  assert got == pytest.approx(best[0], rel=1e-12)
  assert len({int(c) for c in np.unique(codes)}) > 1  # a real mix at these budgets


def test_allocation_json_round_trips_per_projection(tmp_path):
  cfg, params, stats = _setup()
  a = alloc_mod.allocate("exact", cfg, params, stats, 4.0, "bits", target="gguf")
  record = alloc_mod.write_allocation(tmp_path / "a.json", a)
  assert record["target"] == "gguf" and set(record["codes"]["1"]) == set(PROJECTIONS)
  assert record["gguf_types"]["1"]["w_out"] in ("Q4_0", "Q8_0", "F16")
  codes = alloc_mod.read_allocation(tmp_path / "a.json", L, E)
  np.testing.assert_array_equal(codes, a.codes_LxE)
  bad = json.loads((tmp_path / "a.json").read_text())
  del bad["codes"]["1"]["w_out"]
  (tmp_path / "b.json").write_text(json.dumps(bad))
  with pytest.raises(alloc_mod.AllocationError, match="each layer needs the projections"):
    alloc_mod.read_allocation(tmp_path / "b.json", L, E)
  with pytest.raises(alloc_mod.AllocationError, match="allocates 2 layers x 2 experts, but the "
                     "model has 1 layers x 2 experts"):
    alloc_mod.read_allocation(tmp_path / "a.json", 1, E)


@pytest.mark.parametrize("kwargs,match", [
    (dict(budget_value=1.0), r"infeasible for --target gguf: the cheapest exact types already"),
    (dict(target="onnx"), r"allocation target 'onnx' is unknown"),
    (dict(method="paper_combined"), r"use --method exact or mc_moe"),
    (dict(budget_unit="code_bits"), r"--budget-unit bits or bytes"),
    (dict(choices=(1, 2, 4)), r"code 2 \(int2\) has no exact ggml type"),
    (dict(levels=(4, 1)), r"--levels apply to the per-expert"),
])
def test_bad_inputs_are_one_line_errors(kwargs, match):
  cfg, params, stats = _setup()
  args = dict(method="exact", budget_value=4.0, budget_unit="bits", target="gguf")
  args.update(kwargs)
  with pytest.raises(alloc_mod.AllocationError, match=match) as e:
    alloc_mod.allocate(args.pop("method"), cfg, params, stats, args.pop("budget_value"),
                       args.pop("budget_unit"), **args)
  assert "\n" not in str(e.value)


def test_a_spec_no_block_holds_is_refused():
  for rules, match in ((dict(scale_bytes=4), "quant.scale_bytes=2"),
                       (dict(symmetric=False), "quant.symmetric=True")):
    cfg, params, stats = _setup(**rules)
    with pytest.raises(alloc_mod.AllocationError, match=match):
      alloc_mod.allocate("exact", cfg, params, stats, 4.0, "bits", target="gguf")


def test_without_f16_a_projection_with_no_exact_block_is_refused():
  cfg, params, stats = _setup(granularity="group", group_size=16)  # splits every ggml block
  with pytest.raises(alloc_mod.AllocationError, match="no choice is exact for w_gate"):
    alloc_mod.allocate("exact", cfg, params, stats, 20.0, "bits", target="gguf", choices=(1, 4, 8))
  a = alloc_mod.allocate("exact", cfg, params, stats, 20.0, "bits", target="gguf")
  assert np.all(np.asarray(a.codes_LxE) == 0)  # F16 is the stated fallback
