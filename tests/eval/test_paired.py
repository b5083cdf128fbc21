"""Paired differences over evaluation windows: the formula, and its use in evaluate_variants."""

import math

import numpy as np
import pytest

import jax

from moeqjax.eval import evaluate_lm, evaluate_variants
from moeqjax.eval.paired import paired_difference
from moeqjax.eval.report import _cell
from moeqjax.model import init_model, set_expert_codes


def test_paired_difference_formula():
  a = np.array([3.0, 2.5, 4.0, 3.5])
  b = np.array([2.0, 2.0, 3.0, 3.5])
  mean, se = paired_difference(a, b)
  d = [1.0, 0.5, 1.0, 0.0]
  m = sum(d) / 4
  assert mean == pytest.approx(m)
  assert se == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in d) / 3) / 2)
  assert paired_difference([1.0], [0.5]) == (0.5, None)
  with pytest.raises(ValueError, match="equal-length"):
    paired_difference([[1.0]], [[2.0]])


def test_cell_shows_the_standard_error():
  assert _cell({"d": 0.0123, "d_se": 0.0045}, "d", "{:+.4f}") == "+0.0123 ± 0.0045"
  assert _cell({"d": 0.0, "d_se": 0.0}, "d", "{:+.4f}") == "+0.0000"
  assert _cell({"d": 0.5, "d_se": None}, "d", "{:+.4f}") == "+0.5000"


def test_evaluate_variants_paired_deltas(tiny_cfg):
  """delta = difference of overall bits (equal windows); se from the per-window bits."""
  _, params, quant = init_model(tiny_cfg, jax.random.key(0))
  shape = (tiny_cfg.num_layers, tiny_cfg.num_experts)
  windows = np.random.default_rng(0).integers(0, tiny_cfg.vocab_size, size=(5, 9)).astype(np.int32)
  variants = {"full_precision": {"params": params},
              "ctl": {"params": params, "quant": set_expert_codes(quant, np.full(shape, 4))},
              "tern": {"params": params, "quant": set_expert_codes(quant, np.full(shape, 1))}}
  r = evaluate_variants(tiny_cfg, variants, windows, batch_size=2, control="ctl")
  assert r["full_precision"]["delta_vs_fp"] == 0.0 and r["full_precision"]["delta_vs_fp_se"] == 0.0
  for name in ("ctl", "tern"):
    assert r[name]["delta_vs_fp"] == pytest.approx(
        r[name]["bits_per_token"] - r["full_precision"]["bits_per_token"], abs=1e-12)
    assert r[name]["delta_vs_ctl"] == pytest.approx(
        r[name]["bits_per_token"] - r["ctl"]["bits_per_token"], abs=1e-12)
  # The standard error comes from the per-window bits, whose mean is the overall bits.
  tern = evaluate_lm(tiny_cfg, variants["tern"], windows, batch_size=2)
  ref = evaluate_lm(tiny_cfg, variants["full_precision"], windows, batch_size=2)
  assert tern["bits_per_window"].shape == (5,)
  assert np.mean(tern["bits_per_window"]) == pytest.approx(tern["bits_per_token"], rel=1e-12)
  d = tern["bits_per_window"] - ref["bits_per_window"]
  assert r["tern"]["delta_vs_fp_se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(5), rel=1e-9)
  assert r["tern"]["delta_vs_fp_se"] > 0
  # The names every report shares: Δ vs the teacher (= delta_vs_fp) and vs the control, and the
  # routing drift beyond the control's, paired over the same windows.
  tern = r["tern"]
  assert (tern["delta_vs_teacher"], tern["delta_vs_teacher_se"]) == (
      tern["delta_vs_fp"], tern["delta_vs_fp_se"])
  assert (tern["delta_vs_control"], tern["delta_vs_control_se"]) == (
      tern["delta_vs_ctl"], tern["delta_vs_ctl_se"])
  assert tern["control_topk_agree"] == pytest.approx(r["ctl"]["topk_agree"], abs=1e-12)
  assert tern["control_top1_agree"] == pytest.approx(r["ctl"]["top1_agree"], abs=1e-12)
  assert tern["drift_topk"] == pytest.approx(tern["topk_agree"] - r["ctl"]["topk_agree"], abs=1e-12)
  assert tern["drift_top1"] == pytest.approx(tern["top1_agree"] - r["ctl"]["top1_agree"], abs=1e-12)
  assert tern["drift_topk_se"] is not None and tern["drift_topk"] != 0.0
  assert "drift_topk" not in r["ctl"] and "delta_vs_teacher" not in r["full_precision"]
  with pytest.raises(ValueError, match="control"):
    evaluate_variants(tiny_cfg, variants, windows, batch_size=2, control="missing")


def test_reference_eval_is_reused_not_recomputed(tiny_cfg, monkeypatch):
  """A precomputed reference evaluation gives the same results as evaluating it again."""
  from moeqjax.eval import variants as variants_mod
  _, params, quant = init_model(tiny_cfg, jax.random.key(0))
  shape = (tiny_cfg.num_layers, tiny_cfg.num_experts)
  windows = np.random.default_rng(1).integers(0, tiny_cfg.vocab_size, size=(3, 9)).astype(np.int32)
  models = {"full_precision": {"params": params},
            "tern": {"params": params, "quant": set_expert_codes(quant, np.full(shape, 1))}}
  want = evaluate_variants(tiny_cfg, models, windows, batch_size=2)
  ref = evaluate_lm(tiny_cfg, models["full_precision"], windows, batch_size=2)
  calls = []
  real = variants_mod.evaluate_lm
  monkeypatch.setattr(variants_mod, "evaluate_lm", lambda *a, **k: calls.append(1) or real(*a, **k))
  got = evaluate_variants(tiny_cfg, models, windows, batch_size=2, reference_eval=ref)
  assert len(calls) == 1  # the student only
  assert got == want
