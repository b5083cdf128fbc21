"""Evaluates model variants side by side against the full-precision reference."""

from __future__ import annotations

import math

import numpy as np

from moeqjax.eval.control import control_comparison, window_metrics
from moeqjax.eval.lm_eval import evaluate_lm
from moeqjax.eval.memory_report import model_memory
from moeqjax.eval.paired import paired_difference
from moeqjax.eval.routing_metrics import expert_load, load_drift_kl, routing_agreement
from moeqjax.model import ModelConfig

REFERENCE = "full_precision"


def evaluate_variants(cfg: ModelConfig, variants: dict, windows_NxS1: np.ndarray,
                      batch_size: int, *, control: str | None = None,
                      reference_eval: dict | None = None, placement=None,
                      per_window: bool = False) -> dict:
  """Held-out loss, routing consistency, expert load and true memory of every variant.

  Args:
    cfg: the model config shared by all variants.
    variants: name -> variables ({"params"} or {"params", "quant"}); must contain
      "full_precision", the routing reference.
    windows_NxS1: evaluation windows.
    batch_size: windows per forward pass.
    control: optional name of a variant (e.g. "fp_continued": full precision trained with the
      students' objective and schedule) that every variant is also compared with:
      `delta_vs_<control>` and its paired standard error `delta_vs_<control>_se`; and every
      variant but the reference and the control gets eval.control.control_comparison's fields
      (`delta_vs_control`, `control_topk_agree`, `drift_topk`, ... with paired standard errors).
    reference_eval: optional evaluate_lm result of the reference on these windows, used instead
      of evaluating it again (loops that score many students against one teacher).
    placement: evaluate on this mesh (see evaluate_lm); None: the default device.
    per_window: also give each variant's `bits_per_window`, `topk_agree_per_window` and
      `top1_agree_per_window` (lists over the windows), for paired comparisons made later (the
      study compares cells with controls trained in other calls).

  Returns:
    name -> metrics dict (floats and per-layer lists; JSON-ready). Every variant has
    `delta_vs_fp` = its bits per token minus the reference's, and `delta_vs_fp_se`, the standard
    error of that difference paired over the evaluation windows (None with one window); every
    variant but the reference also has the same under the name every report shares,
    `delta_vs_teacher` and `delta_vs_teacher_se`.
  """
  if REFERENCE not in variants:
    raise ValueError(f"variants must include {REFERENCE!r} as the routing reference")
  if control is not None and control not in variants:
    raise ValueError(f"the control {control!r} is not among the variants {sorted(variants)}")
  baselines = {"fp": REFERENCE} if control is None else {"fp": REFERENCE, control: control}
  order = [REFERENCE] + [n for n in variants if n != REFERENCE]
  raw = {name: (reference_eval if name == REFERENCE and reference_eval is not None
                else evaluate_lm(cfg, variants[name], windows_NxS1, batch_size, placement,
                                 desc=f"eval {name}")) for name in order}
  ref_idx = raw[REFERENCE]["expert_idx"]
  ref_load = expert_load(ref_idx, cfg.num_experts)
  by_window = window_metrics(raw, teacher=REFERENCE, num_experts=cfg.num_experts)
  compared = control_comparison(by_window, teacher=REFERENCE, control=control)
  results = {}
  for name in order:
    ev = raw[name]
    agree = routing_agreement(ref_idx, ev["expert_idx"], cfg.num_experts)
    load = expert_load(ev["expert_idx"], cfg.num_experts)
    variables = variants[name]
    memory = model_memory(cfg, variables["params"], variables.get("quant"))
    results[name] = {
        "nll": ev["nll"],
        "bits_per_token": ev["bits_per_token"],
        # exp(nats per token): per byte for byte-level data, per token with a tokenizer.
        "perplexity": math.exp(min(ev["nll"], 700.0)),  # capped: exp overflows a float past ~709
        "eval_tokens": ev["tokens"],
        # With model.capacity_factor: the pairs the capacity dropped in these windows (else None).
        "drop_rate": ev.get("drop_rate"),
        "topk_agree": float(np.mean(agree["topk_agree"])),
        "top1_agree": float(np.mean(agree["top1_agree"])),
        "changed_frac": float(np.mean(agree["changed_frac"])),
        "topk_agree_per_layer": agree["topk_agree"].tolist(),
        "top1_agree_per_layer": agree["top1_agree"].tolist(),
        "changed_frac_per_layer": agree["changed_frac"].tolist(),
        "load_kl": float(np.mean(load_drift_kl(ref_load, load))),
        "expert_load": load.tolist(),
        **memory,
    }
    for label, base in baselines.items():
      delta, se = paired_difference(ev["bits_per_window"], raw[base]["bits_per_window"])
      results[name][f"delta_vs_{label}"] = delta
      results[name][f"delta_vs_{label}_se"] = se
    # Only new keys: topk_agree and top1_agree keep the per-layer means above (equal up to rounding).
    for key, value in compared.get(name, {}).items():
      results[name].setdefault(key, value)
    if per_window:
      results[name].update({"bits_per_window": by_window[name]["bits"].tolist(),
                            "topk_agree_per_window": by_window[name]["topk_agree"].tolist(),
                            "top1_agree_per_window": by_window[name]["top1_agree"].tolist()})
  return results
