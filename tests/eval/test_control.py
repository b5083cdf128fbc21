"""Δ against the teacher and the same-objective control, and quantization-only routing drift, on hand-made windows."""

import math

import numpy as np
import pytest

from moeqjax.eval import routing_agreement
from moeqjax.eval.control import control_comparison, window_metrics
from moeqjax.eval.routing_metrics import window_agreement

# [L=2, T=4, K=2]: two windows of two tokens. Layer 1 routes as the teacher in every model, so each
# window's agreement is the mean of layer 0's and 1.
TEACHER = np.array([[[0, 1], [2, 3], [0, 2], [1, 3]],
                    [[0, 1], [1, 2], [2, 3], [3, 0]]])
# layer 0 overlaps 2, 1, 0, 2 of 2 -> 1, .5, 0, 1; top-1 equal: no, yes, no, yes
STUDENT = np.stack([[[1, 0], [2, 0], [3, 1], [1, 3]], TEACHER[1]])
# layer 0 overlaps 2, 2, 1, 1 -> 1, 1, .5, .5; top-1 equal everywhere
CONTROL = np.stack([[[0, 1], [2, 3], [0, 3], [1, 2]], TEACHER[1]])


def test_window_agreement_hand_example():
  w = window_agreement(TEACHER, STUDENT, num_experts=4, num_windows=2)
  np.testing.assert_allclose(w["topk_agree"], [(0.75 + 1) / 2, (0.5 + 1) / 2])
  np.testing.assert_allclose(w["top1_agree"], [(0.5 + 1) / 2, (0.5 + 1) / 2])
  # Equal windows: the mean over windows is routing_agreement's mean over layers.
  per_layer = routing_agreement(TEACHER, STUDENT, num_experts=4)
  assert np.mean(w["topk_agree"]) == pytest.approx(np.mean(per_layer["topk_agree"]))
  assert np.mean(w["top1_agree"]) == pytest.approx(np.mean(per_layer["top1_agree"]))
  with pytest.raises(ValueError, match="equal windows"):
    window_agreement(TEACHER, STUDENT, num_experts=4, num_windows=3)


def test_control_comparison_hand_oracle():
  evals = {"teacher": {"bits_per_window": [2.0, 3.0], "expert_idx": TEACHER},
           "ctl": {"bits_per_window": [1.9, 2.8], "expert_idx": CONTROL},
           "student": {"bits_per_window": [2.1, 3.3], "expert_idx": STUDENT}}
  windows = window_metrics(evals, teacher="teacher", num_experts=4)
  np.testing.assert_allclose(windows["teacher"]["topk_agree"], [1.0, 1.0])
  r = control_comparison(windows, teacher="teacher", control="ctl")
  assert set(r) == {"ctl", "student"}  # the teacher is not compared with itself
  # The control against the teacher only: bits [-.1, -.2]; agreement [1, .75] and [1, 1].
  assert set(r["ctl"]) == {"delta_vs_teacher", "delta_vs_teacher_se", "topk_agree", "top1_agree"}
  assert r["ctl"]["delta_vs_teacher"] == pytest.approx(-0.15)
  assert r["ctl"]["delta_vs_teacher_se"] == pytest.approx(0.05)
  s = r["student"]
  # bits: vs teacher [0.1, 0.3], vs control [0.2, 0.5]; se = |d1 - d2| / 2 for two windows
  assert s["delta_vs_teacher"] == pytest.approx(0.2)
  assert s["delta_vs_teacher_se"] == pytest.approx(0.1)
  assert s["delta_vs_control"] == pytest.approx(0.35)
  assert s["delta_vs_control_se"] == pytest.approx(0.15)
  # agreement per window: student top-k [.875, .75], top-1 [.75, .75]; control [1, .75], [1, 1]
  assert s["topk_agree"] == pytest.approx(0.8125) and s["top1_agree"] == pytest.approx(0.75)
  assert s["control_topk_agree"] == pytest.approx(0.875) and s["control_top1_agree"] == 1.0
  # drift per window: top-k [-.125, 0], top-1 [-.25, -.25]
  assert s["drift_topk"] == pytest.approx(-0.0625)
  assert s["drift_topk_se"] == pytest.approx(0.0625)
  assert s["drift_top1"] == pytest.approx(-0.25) and s["drift_top1_se"] == pytest.approx(0.0)
  # The standard error is the textbook one over the windows' differences.
  d = np.array([-0.125, 0.0])
  assert s["drift_topk_se"] == pytest.approx(np.std(d, ddof=1) / math.sqrt(2))
  # Without a control: the teacher's fields only.
  alone = control_comparison(windows, teacher="teacher", control=None)
  assert set(alone) == {"ctl", "student"}
  assert set(alone["student"]) == {"delta_vs_teacher", "delta_vs_teacher_se", "topk_agree",
                                   "top1_agree"}
  assert alone["ctl"]["delta_vs_teacher"] == pytest.approx(-0.15)
  with pytest.raises(ValueError, match="control 'missing'"):
    control_comparison(windows, teacher="teacher", control="missing")


def test_demo_table_shows_control_agreement_and_drift():
  """The demo report's columns: the control's agreement and each row's drift ± its paired s.e.;
  the teacher and the control, which have no drift against the control, show "-"."""
  from moeqjax.eval.report import _table
  base = {"bits_per_token": 2.0, "perplexity": 4.0, "delta_vs_fp": 0.0, "delta_vs_fp_se": 0.0,
          "topk_agree": 1.0, "top1_agree": 1.0}
  results = {
      "full_precision": dict(base),
      "fp_continued": dict(base, topk_agree=0.965, delta_vs_fp_continued=0.0,
                           delta_vs_fp_continued_se=0.0),
      "qat_ternary": dict(base, topk_agree=0.945, control_topk_agree=0.965, drift_topk=-0.02,
                          drift_topk_se=0.004, drift_top1=-0.031, drift_top1_se=0.006,
                          delta_vs_fp_continued=0.0123, delta_vs_fp_continued_se=0.0045)}
  lines = _table(results, "byte", {}).splitlines()
  head = [c.strip() for c in lines[0].strip("|").split("|")]
  assert {"control top-k agree", "top-k drift vs control (± paired s.e.)",
          "top-1 drift vs control (± paired s.e.)"} <= set(head)
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
          for line in lines[2:5]}
  col = head.index("top-k drift vs control (± paired s.e.)")
  assert rows["`qat_ternary`"][col] == "-0.020 ± 0.0040"
  assert rows["`qat_ternary`"][head.index("top-1 drift vs control (± paired s.e.)")] == "-0.031 ± 0.0060"
  assert rows["`qat_ternary`"][head.index("control top-k agree")] == "0.965"
  assert rows["`fp_continued`"][col] == "-" and rows["`full_precision`"][col] == "-"
