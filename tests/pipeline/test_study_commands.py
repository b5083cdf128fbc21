"""`moeqjax stats`, `moeqjax allocate` and `moeqjax qat --allocation` on a minuscule pretrain run."""

import json

import jax
import numpy as np
import pytest

from moeqjax import cli
from moeqjax.alloc import allocation as alloc_mod
from moeqjax.model import init_model
from moeqjax.pipeline import config as config_io
from moeqjax.train import Checkpointer, create_state, make_optimizer

SMALL = ["--config.model.d_model=16", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.head_dim=8", "--config.model.d_ff=32", "--config.model.num_experts=4",
         "--config.model.max_seq_len=32",
         "--config.pretrain.steps=3", "--config.pretrain.batch_size=2", "--config.pretrain.seq_len=16",
         "--config.pretrain.warmup_steps=1", "--config.pretrain.ckpt_every=0",
         "--config.qat.steps=2", "--config.qat.batch_size=2", "--config.qat.seq_len=16",
         "--config.qat.warmup_steps=1", "--config.qat.ckpt_every=0",
         "--config.loss.rec=0", "--config.loss.kd=0", "--config.loss.value=0", "--config.loss.struct=0"]


def small_config():
  config = config_io.load_config(None)
  config_io.apply_overrides(config, dict(a[len("--config."):].split("=", 1) for a in SMALL))
  return config


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pre")
  assert cli.main(["pretrain", "--workdir", str(workdir)] + SMALL) == 0
  return workdir


def _restore(workdir):
  config = small_config()
  cfg = config_io.model_config(config)
  _, optim = config_io.phase_configs(config.pretrain, "pretrain")
  tx = make_optimizer(optim)
  template = jax.eval_shape(
      lambda: create_state(init_model(cfg, jax.random.key(0))[1], tx, cfg.num_layers))
  ckpt = Checkpointer(workdir / "ckpt", every=0)
  try:
    return cfg, ckpt.restore(template)
  finally:
    ckpt.close()


def test_stats_cli_equals_state_stats(pretrained, capsys):
  assert cli.main(["stats", "--workdir", str(pretrained)]) == 0
  out = capsys.readouterr().out
  assert "lambda" in out and "router_stats.json" in out
  record = json.loads((pretrained / "router_stats.json").read_text())
  # Issue 11 defect 5b: the gradient sums are reported as their own signal, not as Lambda's proxy.
  assert "separate signal from lambda" in record["definitions"]["grad_norm_sum"]
  cfg, state = _restore(pretrained)
  stats = jax.device_get(state.stats)
  assert record["stats_steps"] == int(stats["steps"]) == 3
  for key in ("router_norm_start", "grad_norm_sum", "grad_norm_ema", "count"):
    np.testing.assert_allclose(record[key], np.asarray(stats[key]), rtol=1e-6, err_msg=key)
  count = np.asarray(stats["count"])
  np.testing.assert_allclose(record["mean_gate"], np.asarray(stats["gate_sum"]) / np.maximum(count, 1),
                             rtol=1e-6)
  now = np.linalg.norm(np.stack([np.asarray(state.params[f"layers_{i}"]["moe"]["router"]["kernel"])
                                 for i in range(cfg.num_layers)]), axis=1)
  np.testing.assert_allclose(record["lambda"], now - np.asarray(stats["router_norm_start"]),
                             rtol=1e-5, atol=1e-6)
  assert np.asarray(record["count"]).sum() == 3 * 2 * 16 * cfg.num_layers * cfg.top_k


@pytest.mark.parametrize("method", alloc_mod.METHODS)
def test_allocate_cli_writes_allocation_within_budget(pretrained, method, tmp_path):
  out = tmp_path / "allocation.json"
  assert cli.main(["allocate", "--workdir", str(pretrained), "--method", method, "--budget", "2.5",
                   "--budget-unit", "code_bits", "--out", str(out)]) == 0
  record = json.loads(out.read_text())
  cfg = config_io.model_config(small_config())
  codes = alloc_mod.read_allocation(out, cfg.num_layers, cfg.num_experts)
  assert record["method"] == method and record["within_budget"]
  assert record["achieved"]["bytes"] == alloc_mod.achieved(cfg, codes)["bytes"]
  assert record["achieved"]["bytes"] <= record["budget"]["bytes"]
  assert record["budget"]["bytes"] == alloc_mod.budget_bytes(cfg, 2.5, "code_bits")
  if method in alloc_mod.RULE_METHODS:
    # Rule-based methods share the same counts per level: exactly the same bytes. 2.5 code bits is
    # 2-bit/int3 half and half, the 2-bit code being whichever of ternary and int2 (2 stored bits
    # each, equal bytes) has the lower mean relative error in the layer.
    assert record["achieved"]["code_bits"] == pytest.approx(2.5)
    params = _restore(pretrained)[1].params
    err = alloc_mod.quant_error_table(params, cfg, (1, 2))[0].mean(axis=0)
    low = 1 if err[0] <= err[1] else 2
    assert sorted(codes[0].tolist()) == [low, low, 3, 3]


def test_allocate_cli_levels_and_help(pretrained, tmp_path, capsys):
  """Issue 11 defect 3: `--levels BH,BL` sets the paper's levels; `--help` says how rules become bytes."""
  out = tmp_path / "allocation.json"
  assert cli.main(["allocate", "--workdir", str(pretrained), "--method", "paper_router", "--budget",
                   "3.5", "--budget-unit", "code_bits", "--levels", "4,1", "--out", str(out)]) == 0
  cfg = config_io.model_config(small_config())
  codes = alloc_mod.read_allocation(out, cfg.num_layers, cfg.num_experts)
  for row in codes:  # 2-bit ternary: n_high = floor(4 * (3.5 - 2) / (4 - 2)) = 3
    assert sorted(row.tolist()) == [1, 4, 4, 4]
  capsys.readouterr()
  assert cli.main(["allocate", "--workdir", str(pretrained), "--method", "paper_router", "--budget",
                   "2.5", "--budget-unit", "code_bits", "--levels", "three,one"]) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--levels" in err and "3,1" in err
  with pytest.raises(SystemExit):
    cli.main(["allocate", "--help"])
  text = " ".join(capsys.readouterr().out.split())
  assert "turned into bytes" in text and "floor((B - E*bytes_lo) / (bytes_hi - bytes_lo))" in text
  assert "--levels BH,BL" in text and "lower mean weight error" in text
  for method in alloc_mod.RULE_METHODS:
    assert method in text.split("turned into bytes")[0]


def test_allocate_infeasible_budget_is_one_line_error(pretrained, capsys):
  rc = cli.main(["allocate", "--workdir", str(pretrained), "--method", "exact", "--budget", "1.0",
                 "--budget-unit", "code_bits"])
  err = capsys.readouterr().err.strip()
  assert rc == 2
  assert len(err.splitlines()) == 1 and "infeasible" in err and "raise the budget" in err


def test_qat_uses_allocation(pretrained, tmp_path):
  alloc_path = tmp_path / "allocation.json"
  assert cli.main(["allocate", "--workdir", str(pretrained), "--method", "paper_combined",
                   "--budget", "3.0", "--out", str(alloc_path)]) == 0
  qat_dir = tmp_path / "qat"
  assert cli.main(["qat", "--workdir", str(qat_dir), "--teacher", str(pretrained),
                   "--allocation", str(alloc_path)] + SMALL) == 0
  cfg = config_io.model_config(small_config())
  want = alloc_mod.read_allocation(alloc_path, cfg.num_layers, cfg.num_experts)
  assert json.loads((qat_dir / "config.json").read_text())["expert_codes"] == want.tolist()
  # `stats` also reads a QAT workdir and reports the codes it holds.
  assert cli.main(["stats", "--workdir", str(qat_dir)]) == 0
  record = json.loads((qat_dir / "router_stats.json").read_text())
  assert record["phase"] == "qat" and record["expert_codes"] == want.tolist()


def test_study_small_is_the_larger_study():
  """Issue 11: at least 4x study_tiny's parameters, budgets 2.0/2.25/2.5/3.0, PTQ and QAT rows."""
  from moeqjax.convert.plan import plan
  from moeqjax.pipeline.study import _settings
  tiny, small = (config_io.load_config(f"configs/{n}.py") for n in ("study_tiny", "study_small"))
  params = [plan(config_io.model_config(c), 1, 8)["params_total"] for c in (tiny, small)]
  assert params[1] >= 4 * params[0]
  st = _settings(small, quick=False)
  assert st["pareto_budgets"] == (2.0, 2.25, 2.5, 3.0) and st["main_budget"] in st["pareto_budgets"]
  assert st["ptq"] == ("rtn", "gptq") and len(st["objectives"]) == 5
  assert _settings(tiny, quick=False).get("ptq") is None  # study_tiny's cells keep their fingerprint
