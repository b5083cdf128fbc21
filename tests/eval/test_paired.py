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
