"""The study's post-training rows: every allocation at every budget, quantized by RTN or GPTQ without training."""

from __future__ import annotations

import dataclasses
import time

from tqdm.auto import tqdm

from moeqjax.eval import evaluate_variants
from moeqjax.model import default_quant, set_expert_codes
from moeqjax.pipeline.ptq import METHODS as PTQ_METHODS
from moeqjax.pipeline.ptq import gptq_experts
from moeqjax.pipeline.ptq_calib import expert_hessians


def ptq_key(ptq_method: str, method: str, budget: float, seed: int) -> str:
  return f"{ptq_method}|{method}|{budget:g}|{seed}"


def row_config(cfg, ptq_method: str):
  """The model config a PTQ row quantizes and evaluates with: GPTQ rows carry GPTQ's scale ratios
  (quant.stored_ratio=True, with `cfg`'s scale_init); RTN rows use `cfg`."""
  if ptq_method != "gptq":
    return cfg
  return dataclasses.replace(cfg, quant=dataclasses.replace(cfg.quant, stored_ratio=True))


def run_ptq_rows(store, config, cfg, teacher, task, windows, st: dict, allocs: dict, budgets,
                 teacher_eval: dict | None = None):
  """Fills store.data["ptq_cells"]: for each PTQ method in st["ptq"], allocation method and budget
  (every seed for "random", whose allocation depends on it; seed 0 otherwise), the teacher quantized
  at the allocation's codes and evaluated like the QAT cells. GPTQ's per-expert Hessians come from
  st["ptq_calib_batches"] batches of the task's training split, routed by the teacher, once.
  GPTQ rows quantize and evaluate with `row_config` (GPTQ's stored scale ratios). `teacher_eval` (the
  teacher's evaluate_lm result on `windows`) saves evaluating the teacher again for every row.
  """
  for name in st["ptq"]:
    if name not in PTQ_METHODS:
      raise ValueError(f"study.ptq has {name!r}; use {', '.join(PTQ_METHODS)}")
  cells = store.data.setdefault("ptq_cells", {})
  todo = [(p, m, b, seed) for p in st["ptq"] for b in budgets for m in st["methods"]
          for seed in range(st["seeds"] if m == "random" else 1)
          if ptq_key(p, m, b, seed) not in cells]
  if not todo:
    return
  quant = default_quant(cfg)
  hessians = None
  for p, m, b, seed in tqdm(todo, desc="ptq rows", dynamic_ncols=True):
    t = time.perf_counter()
    codes = allocs[(m, b, seed)].codes_LxE
    params, report, row_cfg = teacher, {}, row_config(cfg, p)
    if p == "gptq":
      if hessians is None:
        hessians = expert_hessians(cfg, teacher, task.train, batches=st["ptq_calib_batches"],
                                   batch_size=config.qat.batch_size, seq_len=config.qat.seq_len,
                                   seed=config.qat.seed)
      params, report = gptq_experts(row_cfg, teacher, hessians, codes)
    r = evaluate_variants(row_cfg, {"full_precision": {"params": teacher},
                                "student": {"params": params,
                                            "quant": set_expert_codes(quant, codes)}},
                          windows, config.eval.batch_size, reference_eval=teacher_eval,
                          per_window=True)["student"]
    cells[ptq_key(p, m, b, seed)] = {
        "ptq": p, "method": m, "budget": b, "seed": seed, "bits_per_byte": r["bits_per_token"],
        "topk_agree": r["topk_agree"], "top1_agree": r["top1_agree"],
        "expert_bytes": r["expert_bytes"], "expert_code_bits": r["expert_code_bits"],
        "expert_bits_per_weight": r["expert_bits_per_weight"],
        "scale_init": row_cfg.quant.scale_init,
        "calib_output_error": report.get("calib_output_error"),
        "rtn_fallback_no_tokens": report.get("rtn_fallback_no_tokens", []),
        # Per window: the summary pairs rows with the teacher and with uniform over the windows.
        "bits_per_window": r["bits_per_window"], "topk_agree_per_window": r["topk_agree_per_window"],
        "seconds": time.perf_counter() - t}
    store.save()
