"""Rule-based allocations in bytes: byte ties, the paper's levels, and code-bit budgets with zero points."""

import jax
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax import alloc
from moeqjax.model import QuantRules, init_model
from moeqjax.quant import memory
from moeqjax.alloc import allocation as alloc_mod
from moeqjax.train import init_router_stats

RULE_METHODS = ("paper_combined", "paper_router", "paper_router_reversed", "router_norm",
                "frequency", "gate_weight", "random")


def _setup(**rules):
  cfg = tiny_model_config(num_experts=8, quant=QuantRules(expert_code=1, **rules))
  _, params, _ = init_model(cfg, jax.random.key(0))
  params = jax.device_get(params)
  stats = jax.device_get(init_router_stats(params, cfg.num_layers))
  r = np.random.default_rng(0)  # distinct, known orders
  stats["count"] = r.permutation(8 * cfg.num_layers).reshape(cfg.num_layers, 8).astype(np.float32)
  return cfg, params, stats


@pytest.mark.parametrize("method", RULE_METHODS + ("uniform",))
def test_byte_tie_prefers_the_lower_error_code(method):
  """Issue 11 defect 3: with 2-bit ternary packing, ternary and int2 cost the same bytes, and the
  rule bracketed the budget with int2/int3, so it could never pick ternary, whatever its error."""
  cfg, params, stats = _setup()
  table = alloc_mod.bytes_table(cfg)[0, 0]
  assert table[0] == table[1]  # choices (1, 2, 3, 4, 8): ternary and int2 tie in bytes
  err = alloc_mod.quant_error_table(params, cfg).mean(axis=(0, 1))
  assert err[0] < err[1]  # absmean ternary beats absmax int2 on these weights
  a = alloc_mod.allocate(method, cfg, params, stats, 2.5 if method != "uniform" else 2.0,
                         "code_bits")
  if method == "uniform":
    np.testing.assert_array_equal(a.codes_LxE, 1)
  else:
    for row in a.codes_LxE:  # 2.5 code bits = half ternary (2.0 bits stored), half int3
      assert sorted(row.tolist()) == [1] * 4 + [3] * 4
    assert a.achieved["code_bits"] == pytest.approx(2.5)


def test_byte_tie_picks_int2_when_it_has_the_lower_error():
  """Issue 11 defect 3: the tie is broken by the error table, not by a fixed preference."""
  cfg, params, stats = _setup()
  err = np.zeros((cfg.num_layers, cfg.num_experts, 5))
  err[..., 0] = 1.0  # ternary worse than int2 (index 1)
  a = alloc_mod.allocate("paper_router", cfg, params, stats, 2.5, "code_bits", err_LxExC=err)
  for row in a.codes_LxE:
    assert sorted(row.tolist()) == [2] * 4 + [3] * 4
  u = alloc_mod.allocate("uniform", cfg, params, stats, 2.0, "code_bits", err_LxExC=err)
  np.testing.assert_array_equal(u.codes_LxE, 2)


def test_paper_levels_match_the_two_level_rule():
  """Issue 11 defect 3: the user passes the paper's levels (bh, bl) = (3, 1). With base-3 ternary
  (1.6 stored bits) at 2.5 code bits, the byte rule equals METHODS.md's two-level rule:
  n_high = 5 of 8, [3 3 3 3 3 1 1 1] in the method's order."""
  cfg, params, stats = _setup(ternary_packing="base3")
  a = alloc_mod.allocate("frequency", cfg, params, stats, 2.5, "code_bits", levels=(3, 1))
  order = np.argsort(-stats["count"], axis=1, kind="stable")
  want = alloc.allocate_by_order(order, 2.5, (3, 1))
  np.testing.assert_array_equal(a.codes_LxE, want)
  for l in range(cfg.num_layers):
    np.testing.assert_array_equal(a.codes_LxE[l][order[l]], [3, 3, 3, 3, 3, 1, 1, 1])
  assert a.achieved["bytes"] <= a.budget_bytes
  assert "levels 3,1" in a.note


def test_paper_levels_errors():
  """Issue 11 defect 3: bad levels are one-line errors that say how to fix them."""
  cfg, params, stats = _setup()
  with pytest.raises(alloc_mod.AllocationError, match="two codes"):
    alloc_mod.allocate("paper_router", cfg, params, stats, 2.5, "code_bits", levels=(3, 2, 1))
  with pytest.raises(alloc_mod.AllocationError, match="more bytes"):
    alloc_mod.allocate("paper_router", cfg, params, stats, 2.5, "code_bits", levels=(1, 3))
  with pytest.raises(alloc_mod.AllocationError, match="every expert at int3 already takes"):
    alloc_mod.allocate("paper_router", cfg, params, stats, 2.5, "code_bits", levels=(4, 3))
  with pytest.raises(alloc_mod.AllocationError, match="only apply to the rule-based methods"):
    alloc_mod.allocate("exact", cfg, params, stats, 2.5, "code_bits", levels=(3, 1))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_code_bits_budget_holds_uniform_intn_with_zero_points(bits):
  """Issue 11 defect 4: `code_bits` budgets left out the zero points of asymmetric specs, so a
  4.0 code-bit budget could not hold uniform int4."""
  cfg, params, stats = _setup(symmetric=False, granularity="group", group_size=8)
  uniform = np.full((cfg.num_layers, cfg.num_experts), bits)
  need = memory.expert_bytes(alloc_mod.expert_shapes(cfg), uniform, cfg.quant.spec())["total_bytes"]
  assert alloc_mod.budget_bytes(cfg, float(bits), "code_bits") == need
  a = alloc_mod.allocate("uniform", cfg, params, stats, float(bits), "code_bits")
  np.testing.assert_array_equal(a.codes_LxE, bits)
  assert a.achieved["code_bits"] == bits


def test_code_bits_budget_unchanged_for_symmetric_specs():
  """Issue 11 defect 4 (guard): symmetric specs store no zero points; the budget is bits + scales."""
  cfg, _, _ = _setup()
  uniform = np.full((cfg.num_layers, cfg.num_experts), 4)
  need = memory.expert_bytes(alloc_mod.expert_shapes(cfg), uniform, cfg.quant.spec())["total_bytes"]
  assert alloc_mod.budget_bytes(cfg, 4.0, "code_bits") == need


def test_reversed_lambda_and_router_norm_arms_give_the_high_level_to_their_experts():
  """paper_router: the 4 smallest Lambda get int3; paper_router_reversed: the 4 largest;
  router_norm (the paper's released-checkpoint rule): the 4 smallest final router row norms."""
  cfg, params, stats = _setup()
  r = np.random.default_rng(1)
  stats["router_norm_start"] = r.uniform(0.5, 1.5, size=(cfg.num_layers, 8)).astype(np.float32)
  s = alloc_mod.expert_stats(params, stats, cfg.num_layers)
  want = {"paper_router": s["lambda"], "paper_router_reversed": -s["lambda"],
          "router_norm": s["router_norm_now"]}
  for method, score in want.items():
    a = alloc_mod.allocate(method, cfg, params, stats, 2.5, "code_bits", levels=(3, 1))
    for layer in range(cfg.num_layers):
      high = set(np.flatnonzero(a.codes_LxE[layer] == 3).tolist())
      assert high == set(np.argsort(score[layer], kind="stable")[:4].tolist()), method
  # The reversed arm is the complement of the paper's (no ties in these Lambdas).
  paper = alloc_mod.allocate("paper_router", cfg, params, stats, 2.5, "code_bits", levels=(3, 1))
  rev = alloc_mod.allocate("paper_router_reversed", cfg, params, stats, 2.5, "code_bits",
                           levels=(3, 1))
  np.testing.assert_array_equal(np.where(paper.codes_LxE == 3, 1, 3), rev.codes_LxE)
