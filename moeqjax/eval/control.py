"""Results against the teacher and a same-objective full-precision control, paired over evaluation windows."""

# Full-precision fine-tuning alone moves the loss and the routing (the demo's control agrees with
# the teacher's top-k sets about 0.965 of the time), so a quantized student is read against both:
# the teacher (what it started from) and a control trained with the same objective, steps and
# batches at full precision (what the training alone does). The quantization-only routing drift
# is the student's agreement with the teacher minus the control's.

from __future__ import annotations

import numpy as np

from moeqjax.eval.paired import paired_difference
from moeqjax.eval.routing_metrics import window_agreement


def window_metrics(evals: dict, *, teacher: str, num_experts: int) -> dict:
  """Per-window bits and routing agreement with the teacher, from evaluate_lm results.

  Args:
    evals: name -> an evaluate_lm result ("bits_per_window" [N], "expert_idx" [L, N*S, K]) on the
      same windows; must contain `teacher`.
    teacher: the routing reference.
    num_experts: experts per layer.

  Returns:
    name -> {"bits": [N], "topk_agree": [N], "top1_agree": [N]} (the teacher's agreement is 1).
  """
  ref_idx = evals[teacher]["expert_idx"]
  out = {}
  for name, ev in evals.items():
    bits_N = np.asarray(ev["bits_per_window"], np.float64)
    agree = window_agreement(ref_idx, ev["expert_idx"], num_experts, bits_N.shape[0])
    out[name] = {"bits": bits_N, **agree}
  return out


def control_comparison(windows: dict, *, teacher: str, control: str | None) -> dict:
  """Δ bits against the teacher and the control, and routing drift beyond the control's.

  Args:
    windows: name -> {"bits": [N] mean bits per unit of each window, "topk_agree": [N],
      "top1_agree": [N] agreement of the variant's routing with the teacher's in each window}, all
      on the same N windows (window_metrics makes it); the teacher needs "bits" only.
    teacher: the full-precision model every variant started from.
    control: the full-precision model trained with the students' objective and schedule, or None.

  Returns:
    name -> fields, for every name but the teacher (JSON-ready floats; a standard error is None
    with one window):
      delta_vs_teacher, delta_vs_teacher_se: mean bits minus the teacher's, paired over windows;
      topk_agree, top1_agree: mean agreement with the teacher's routing;
    and with a control, for every name but the teacher and the control, also:
      delta_vs_control, delta_vs_control_se: mean bits minus the control's, paired over windows;
      control_topk_agree, control_top1_agree: the control's agreement with the teacher;
      drift_topk, drift_topk_se, drift_top1, drift_top1_se: the variant's agreement minus the
        control's (negative: quantization moved routing beyond what training alone moved it),
        paired over windows.
  """
  if teacher not in windows:
    raise ValueError(f"the teacher {teacher!r} is not among {sorted(windows)}")
  if control is not None and control not in windows:
    raise ValueError(f"the control {control!r} is not among {sorted(windows)}")
  out = {}
  for name, w in windows.items():
    if name == teacher:
      continue
    r = {}
    r["delta_vs_teacher"], r["delta_vs_teacher_se"] = paired_difference(
        w["bits"], windows[teacher]["bits"])
    r["topk_agree"] = float(np.mean(w["topk_agree"]))
    r["top1_agree"] = float(np.mean(w["top1_agree"]))
    if control is not None and name != control:
      c = windows[control]
      r["delta_vs_control"], r["delta_vs_control_se"] = paired_difference(w["bits"], c["bits"])
      r["control_topk_agree"] = float(np.mean(c["topk_agree"]))
      r["control_top1_agree"] = float(np.mean(c["top1_agree"]))
      r["drift_topk"], r["drift_topk_se"] = paired_difference(w["topk_agree"], c["topk_agree"])
      r["drift_top1"], r["drift_top1_se"] = paired_difference(w["top1_agree"], c["top1_agree"])
    out[name] = r
  return out
