"""`moeqjax study` on a Switch config: the paper's protocol (fine-tune, Lambda, allocation arms at equal expert bytes, PTQ and QAT) with seeds and paired errors."""

# Protocol (written into study.md):
#   1. pretrain the full-precision Switch model (span corruption) on the pretraining slice
#      (switch_phases.pretrain; cached in WORKDIR/pretrain);
#   2. fine-tune it in full precision on the task slice (task CE + Switch's lb and z losses; the
#      QAT section's optimizer at study.finetune_learning_rate); the step collects the router
#      statistics, so Lambda = router row-norm change over this fine-tune (switch_phases.qat at
#      code 0; WORKDIR/finetune{steps}_0). A second fine-tune with another seed (other batches,
#      same start; WORKDIR/finetune{steps}_1) gives a second Lambda: its rank agreement with the
#      first is Lambda's own noise. The fine-tuned model (the first) is the model that is
#      quantized and the frozen teacher of every QAT cell (the paper quantizes the fine-tuned
#      model);
#   3. allocate every arm from the first fine-tune's statistics at the same expert byte budget
#      (alloc.allocate on switch_phases.allocation_view: rows = sparse layers, encoder first);
#   4. PTQ: round-to-nearest of the teacher at each arm's codes (no training);
#   5. QAT: the config's joint objective from the teacher at each arm's codes, per seed
#      (switch_phases.qat; seed s uses qat.seed + 100 s: other batches, and for random another
#      order); the control is the same QAT with every expert at code 0 (same objective, steps
#      and batches per seed);
#   6. evaluate everything on the task slice's fixed held-out span-corruption batches: bits per
#      target token, Δ vs the teacher and the control paired over examples, top-1 routing
#      agreement with the teacher.
# study.json keeps the decoder-only study's layout (study_summary.summarize reads it): its
# "bits_per_byte" / "bits_per_window" fields hold bits per TARGET TOKEN / per EXAMPLE here
# (meta.unit says so). Every finished cell is saved at once, so a killed study resumes; the runs'
# folders carry their step counts (finetune150_0, qat60_uniform_s1, control60_s0), so --quick and
# the default settings share one workdir (and its pretrain).

from __future__ import annotations

import copy
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import numpy as np

from moeqjax.alloc import allocation as alloc_mod
from moeqjax.eval import evaluate_seq2seq
from moeqjax.eval.paired import paired_difference
from moeqjax.eval.routing_metrics import routing_agreement
from moeqjax.model import default_quant, init_ratios, set_expert_codes, without_ratios
from moeqjax.objectives.seq2seq import STACKS
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import switch_phases
from moeqjax.pipeline.ptq import gptq_experts
from moeqjax.pipeline.study_ptq import row_config
from moeqjax.pipeline.study import _Store, slice_corpus  # pylint: disable=protected-access
from moeqjax.pipeline.study_report import METHOD_LABELS, _lambda_noise_lines, _pm, _winner_line
from moeqjax.pipeline.study_summary import summarize

OBJECTIVE = "joint"  # the config's loss section: one objective per Switch study
RTN, GPTQ = "rtn", "gptq"
PTQ_LABELS = {RTN: "RTN", GPTQ: "GPTQ"}
UNIT = switch_phases.UNIT  # "target token"
DEFAULT_CONFIG = "configs/switch_study.py"


def settings(config, quick: bool) -> dict:
  """The study's settings from config.study (with its quick overrides under --quick)."""
  s = config.study.to_dict()
  q = s.get("quick", {}) if quick else {}
  budget = float(s["budget"])
  return {"methods": tuple(s["methods"]), "objectives": {OBJECTIVE: {}},
          "seeds": int(q.get("seeds", s["seeds"])), "budget_unit": s["budget_unit"],
          "main_budget": budget, "pareto_budgets": (budget,),
          "choices": tuple(int(c) for c in s["choices"]),
          "levels": tuple(int(c) for c in s["levels"]),
          "qat_steps": int(q.get("qat_steps", config.qat.steps)),
          "finetune_steps": int(q.get("finetune_steps", s["finetune_steps"])),
          "finetune_learning_rate": float(s["finetune_learning_rate"]),
          "ptq": tuple(s.get("ptq", (RTN,))),
          "ptq_calib_batches": int(s.get("ptq_calib_batches", 8)), "quick": quick,
          "family": "switch"}


def _fingerprint_settings(st: dict) -> dict:
  """The settings that decide the trained cells. PTQ rows are keyed by their method and train
  nothing, so which PTQ methods run (and GPTQ's calibration) is left out: adding GPTQ rows to a
  finished study keeps its QAT cells (the key keeps its first value, so older studies match)."""
  return {**{k: v for k, v in st.items() if k != "ptq_calib_batches"}, "ptq": (RTN,)}


def _with(config, **sections) -> object:
  """A copy of `config` with the given {section: {field: value}} updates."""
  out = copy.deepcopy(config)
  for name, values in sections.items():
    with out[name].unlocked():
      out[name].update(values)
  return out


def finetune_config(config, st: dict, replicate: int):
  """The full-precision fine-tune as a Switch QAT run: code 0, task + lb + z only, the QAT
  optimizer at study.finetune_learning_rate, its own seed per replicate."""
  return _with(config, quant={"expert_code": 0},
               loss={"rec": 0.0, "kd": 0.0, "value": 0.0, "struct": 0.0},
               qat={"steps": st["finetune_steps"], "learning_rate": st["finetune_learning_rate"],
                    "seed": int(config.qat.seed) + 1000 + 7919 * replicate, "ckpt_every": 0})


def cell_config(config, st: dict, seed: int):
  """A QAT cell's (and its control's) config: qat.steps of the study, seed qat.seed + 100 seed."""
  return _with(config, qat={"steps": st["qat_steps"], "seed": int(config.qat.seed) + 100 * seed,
                            "ckpt_every": 0})


def lambda_stats(config, state) -> tuple[dict, object, dict]:
  """(expert_stats [L_sparse, E], allocation view cfg, view params) of a fine-tune's state."""
  params = without_ratios(state.params)
  view, vparams = switch_phases.allocation_view(config, params)
  stats = alloc_mod.expert_stats(vparams, jax.device_get(state.stats), view.num_layers)
  return stats, view, vparams


def per_layer_agreement(reference: dict, result: dict, num_experts: int) -> list[float]:
  """Top-1 agreement with the reference per sparse layer (real tokens only), encoder first."""
  out = []
  for s in STACKS:
    if reference["expert_idx"][s].shape[0]:
      out += routing_agreement(reference["expert_idx"][s], result["expert_idx"][s], num_experts,
                               reference["token_mask"][s])["top1_agree"].tolist()
  return out


def score(cfg, variables: dict, batches, reference: dict) -> dict:
  """A variant on the held-out batches, with per-example values for the paired comparisons."""
  r = evaluate_seq2seq(cfg, variables, batches)
  n = len(r["bits_per_example"])
  agree = np.asarray(switch_phases.per_example_agreement(reference, r, cfg.num_experts, n),
                     np.float64)
  return {"bits_per_byte": float(r["bits_per_token"]),
          "bits_per_window": np.asarray(r["bits_per_example"], np.float64).tolist(),
          "top1_agree_per_window": agree.tolist(), "topk_agree_per_window": agree.tolist(),
          "top1_agree": float(agree.mean()), "topk_agree": float(agree.mean()),
          "topk_agree_per_layer": per_layer_agreement(reference, r, cfg.num_experts),
          "drop_rate": float(r["drop_rate"]["all"])}


def quantized(cfg, teacher, codes) -> dict:
  """RTN of the teacher at `codes` [L_sparse, E] (the QAT student's step-0 variables)."""
  quant = set_expert_codes(default_quant(cfg), np.asarray(codes, np.int32))
  return {"params": init_ratios(cfg, teacher, quant), "quant": quant}


def gptq_quantized(cfg, teacher, hessians, codes) -> tuple[object, dict, dict]:
  """(the GPTQ row's config, variables, GPTQ's report): the teacher's experts by GPTQ at `codes`
  (pipeline.ptq.gptq_experts, shared with `moeqjax ptq`); the config stores GPTQ's ratios."""
  row_cfg = row_config(cfg, GPTQ)
  quant = set_expert_codes(default_quant(row_cfg), np.asarray(codes, np.int32))
  params, report = gptq_experts(row_cfg, init_ratios(row_cfg, teacher, quant), hessians, codes)
  return row_cfg, {"params": params, "quant": quant}, report


def paper_vs_others(data: dict) -> dict:
  """Per regime (rtn, qat): each other arm minus paper_combined in bits per target token, paired
  over examples (QAT: each arm's seed-averaged examples; random: its seeds' average), and for QAT
  the per-seed differences (the same seed = the same batches)."""
  methods = data["meta"]["settings"]["methods"]
  if "paper_combined" not in methods:
    return {}
  out = {}
  regimes = {p: [c for c in data.get("ptq_cells", {}).values() if c["ptq"] == p]
             for p in data["meta"]["settings"].get("ptq", [RTN])}
  regimes["qat"] = list(data.get("cells", {}).values())
  for regime, cells in regimes.items():
    by = {}
    for c in cells:
      by.setdefault(c["method"], []).append(c)
    if "paper_combined" not in by:
      continue
    mean = {m: np.mean([c["bits_per_window"] for c in rows], axis=0) for m, rows in by.items()}
    seeds = {m: {c["seed"]: c["bits_per_byte"] for c in rows} for m, rows in by.items()}
    rows = {}
    for m in methods:
      if m == "paper_combined" or m not in mean:
        continue
      d, se = paired_difference(mean[m], mean["paper_combined"])
      row = {"delta": d, "delta_se": se}
      if regime == "qat":
        common = sorted(set(seeds[m]) & set(seeds["paper_combined"]))
        row["delta_by_seed"] = [seeds[m][s] - seeds["paper_combined"][s] for s in common]
      rows[m] = row
    out[regime] = rows
  return out


def run_switch_study(config, workdir: pathlib.Path, *, quick: bool, config_path: str = "") -> dict:
  """Runs (or resumes) the Switch study into `workdir`; returns the study.json dict."""
  t_start = time.perf_counter()
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if "study" not in config:
    raise config_io.ConfigError("a Switch study needs a `study` section; start from "
                                f"{DEFAULT_CONFIG}")
  st = settings(config, quick)
  for m in st["methods"]:
    if m not in alloc_mod.METHODS:
      raise config_io.ConfigError(f"study.methods has {m!r}; use {', '.join(alloc_mod.METHODS)}")
  cfg = config_io.switch_config(config)
  pre_corpus = slice_corpus(config.data.pretrain_packages, config.data.valid_fraction)
  task = slice_corpus(config.data.task_packages, config.data.valid_fraction)

  # 1-2: teacher0 (pretrained), two full-precision fine-tunes on the task slice.
  teacher0 = without_ratios(switch_phases.pretrain(config, workdir / "pretrain", pre_corpus,
                                                   resume=True).params)
  fts = [switch_phases.qat(finetune_config(config, st, r),
                           workdir / f"finetune{st['finetune_steps']}_{r}", task,
                           teacher0, expert_codes_LxE=None, resume=True,
                           provenance={"study": "switch fine-tune", "replicate": r})
         for r in range(2)]
  s, view, vparams = lambda_stats(config, fts[0])
  s2, _, vparams2 = lambda_stats(config, fts[1])
  teacher = without_ratios(fts[0].params)

  fingerprint = json.dumps({k: config[k].to_dict() for k in ("model", "quant", "data", "seq2seq",
                                                              "pretrain", "qat", "loss", "eval")},
                           sort_keys=True, default=str) + json.dumps(
                               _fingerprint_settings(st), sort_keys=True, default=str)
  meta = {"fingerprint": fingerprint, "settings": st, "config_path": config_path,
          "family": "switch", "unit": UNIT,
          "unit_note": "bits_per_byte / bits_per_window hold bits per target token / per example",
          "pretrain_slice": list(config.data.pretrain_packages),
          "task_slice": list(config.data.task_packages),
          "pretrain_corpus": pre_corpus.fingerprint, "task_corpus": task.fingerprint,
          "layer_names": switch_phases.sparse_layer_names(teacher),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                     f"{platform.platform()}, jax {jax.__version__}, {jax.devices()[0].platform}"}
  store = _Store(workdir / "study.json", meta)
  cells_before = len(store.data["cells"]) + len(store.data.get("ptq_cells", {}))
  store.data["command"] = ("moeqjax study --config " + (config_path or DEFAULT_CONFIG)
                           + (" --quick" if quick else ""))

  batches = switch_phases.Seq2SeqData(config, cfg, task).eval_batches()
  ref_raw = evaluate_seq2seq(cfg, {"params": teacher}, batches)
  pre = score(cfg, {"params": teacher0}, batches, ref_raw)
  store.data["reference"] = {
      "finetuned_fp_bits_per_byte": float(ref_raw["bits_per_token"]),
      "pretrained_fp_bits_per_byte": pre["bits_per_byte"],
      "pretrained_top1_agree": pre["top1_agree"],
      "eval_tokens": int(ref_raw["tokens"]), "eval_examples": len(ref_raw["bits_per_example"]),
      "drop_rate": float(ref_raw["drop_rate"]["all"]),
      "bits_per_window": np.asarray(ref_raw["bits_per_example"], np.float64).tolist()}
  store.data["stats"] = {k: (np.asarray(v).tolist() if not isinstance(v, int) else v)
                         for k, v in s.items()}
  store.data["lambda_replicate"] = {"lambda": s2["lambda"].tolist(),
                                    "router_norm_now": s2["router_norm_now"].tolist()}

  # 3: allocations (deterministic; recomputed on resume).
  b, unit = st["main_budget"], st["budget_unit"]
  err = alloc_mod.quant_error_table(vparams, view, st["choices"])

  def allocate(method, params, stats, error, seed=0):
    return alloc_mod.allocate(method, view, params, stats, b, unit, choices=st["choices"],
                              seed=seed, err_LxExC=error,
                              levels=st["levels"] if method in alloc_mod.RULE_METHODS else None)

  allocs = {}
  for m in st["methods"]:
    for seed in range(st["seeds"]):
      allocs[(m, seed)] = (allocate(m, vparams, s, err, seed) if m == "random" or seed == 0
                           else allocs[(m, 0)])
  store.data["budget_bytes"] = allocs[(st["methods"][0], 0)].budget_bytes
  store.data["allocations"] = {f"{m}|{b:g}|{seed}": {"codes_LxE": a.codes_LxE.tolist(),
                                                      **a.achieved, "budget_bytes": a.budget_bytes}
                               for (m, seed), a in allocs.items()}
  err2 = alloc_mod.quant_error_table(vparams2, view, st["choices"])
  store.data["replicate_allocations"] = {
      f"{m}|{b:g}": allocate(m, vparams2, s2, err2).codes_LxE.tolist()
      for m in st["methods"] if m not in ("uniform", "random")}
  store.save()

  # 4: PTQ rows (RTN; GPTQ with per-expert Hessians from the task's training batches through the
  # teacher, once, as `moeqjax ptq --method gptq` calibrates).
  ptq_cells = store.data.setdefault("ptq_cells", {})
  hessians = None
  for p in st["ptq"]:
    if p not in PTQ_LABELS:
      raise config_io.ConfigError(f"study.ptq has {p!r}; use {', '.join(PTQ_LABELS)}")
    for (m, seed), a in allocs.items():
      key = f"{p}|{m}|{b:g}|{seed}"
      if key in ptq_cells or (seed > 0 and m != "random"):
        continue
      report = {}
      if p == GPTQ:
        if hessians is None:
          hessians = switch_phases.switch_hessians(config, cfg, task, teacher,
                                                   st["ptq_calib_batches"])
        row_cfg, variables, report = gptq_quantized(cfg, teacher, hessians, a.codes_LxE)
      else:
        row_cfg, variables = cfg, quantized(cfg, teacher, a.codes_LxE)
      r = score(row_cfg, variables, batches, ref_raw)
      ptq_cells[key] = {"ptq": p, "method": m, "budget": b, "seed": seed, **r,
                        "expert_bytes": a.achieved["bytes"],
                        "expert_bits_per_weight": a.achieved["bits_per_weight"],
                        "expert_code_bits": a.achieved["code_bits"],
                        "calib_output_error": report.get("calib_output_error"),
                        "rtn_fallback_no_tokens": report.get("rtn_fallback_no_tokens", [])}
      store.save()

  # 5: QAT cells and the same-objective full-precision control, seed by seed.
  controls = store.data["controls"]
  control = controls.setdefault(OBJECTIVE, {
      "objective": OBJECTIVE, "by_seed": {},
      "what": f"full precision (every expert at code 0), {st['qat_steps']} steps of the config's "
              "joint QAT objective from the teacher, the same batches as the QAT cells of each "
              "seed"})
  fp_codes = np.zeros((view.num_layers, view.num_experts), np.int32)
  for seed in range(st["seeds"]):
    c_config = cell_config(config, st, seed)
    if str(seed) not in control["by_seed"]:
      t = time.perf_counter()
      state = switch_phases.qat(c_config, workdir / f"control{st['qat_steps']}_s{seed}", task,
                                teacher, expert_codes_LxE=fp_codes, resume=True)
      r = score(cfg, {"params": state.params, "quant": state.quant}, batches, ref_raw)
      control["by_seed"][str(seed)] = {**r, "seconds": time.perf_counter() - t}
      store.save()
    for m in st["methods"]:
      key = f"{OBJECTIVE}|{m}|{b:g}|{seed}"
      if key in store.data["cells"]:
        continue
      a, t = allocs[(m, seed)], time.perf_counter()
      state = switch_phases.qat(c_config, workdir / f"qat{st['qat_steps']}_{m}_s{seed}", task,
                                teacher, expert_codes_LxE=a.codes_LxE, resume=True)
      r = score(cfg, {"params": state.params, "quant": state.quant}, batches, ref_raw)
      store.data["cells"][key] = {
          "objective": OBJECTIVE, "method": m, "budget": b, "seed": seed, **r,
          "expert_bytes": a.achieved["bytes"],
          "expert_bits_per_weight": a.achieved["bits_per_weight"],
          "expert_code_bits": a.achieved["code_bits"], "seconds": time.perf_counter() - t}
      store.save()

  store.data["summary"] = summarize(store.data)
  store.data["summary"]["paper_vs_others"] = paper_vs_others(store.data)
  store.data["wall_seconds_this_invocation"] = time.perf_counter() - t_start
  store.data.setdefault("invocations", []).append(
      {"seconds": store.data["wall_seconds_this_invocation"],
       "new_cells": len(store.data["cells"]) + len(ptq_cells) - cells_before})
  store.save()
  write_markdown(workdir, store.data)
  return store.data


# ---- report


def _z(row) -> str:
  return "-" if not row or not row["delta_se"] else f"{row['delta'] / row['delta_se']:+.1f}"


def _codes_text(a: dict) -> str:
  codes = np.asarray(a["codes_LxE"])
  values, counts = np.unique(codes, return_counts=True)
  return ", ".join(f"{int(n)}x code {int(v)}" for v, n in zip(values, counts))


def write_markdown(workdir: pathlib.Path, data: dict) -> str:
  """WORKDIR/study.md: protocol, the arm table (PTQ and QAT), paper_combined vs each arm, Lambda's
  noise and the multiplicity caveat."""
  st, summ, ref, meta = data["meta"]["settings"], data["summary"], data["reference"], data["meta"]
  b = st["main_budget"]
  extra_ptq = [x for x in st.get("ptq", (RTN,)) if x != RTN]
  tc, pc = meta["task_corpus"], meta["pretrain_corpus"]
  lines = [f"# Switch study: the paper's protocol ({'QUICK' if st['quick'] else 'default'} "
           "settings)", "", f"Command: `{data['command']}`  ", f"Machine: {meta['machine']}  ",
           "Wall time per invocation (finished phases and cells are reused): "
           + ", ".join(f"{i['seconds'] / 60:.1f} min ({i['new_cells']} new cells)"
                       for i in data.get("invocations", [])), "",
           "## Protocol", "",
           f"- Pretrain (span corruption) on stdlib {', '.join(meta['pretrain_slice'])} "
           f"({pc['train_bytes']:,} train bytes).",
           f"- Fine-tune in full precision ({st['finetune_steps']} steps, lr "
           f"{st['finetune_learning_rate']:g}, task CE + lb + z) on stdlib "
           f"{', '.join(meta['task_slice'])} ({tc['train_bytes']:,} / {tc['valid_bytes']:,} "
           "train / held-out bytes). Lambda_s = ||w_s(T)|| - ||w_s(0)|| of each router row over "
           "this fine-tune; a second fine-tune (another seed) gives a second Lambda. The "
           "fine-tuned model is quantized and is every QAT cell's frozen teacher.",
           f"- Allocation at {b:g} {st['budget_unit']} ({data['budget_bytes']:,} expert bytes), "
           f"rows = sparse layers {', '.join(meta['layer_names'])}; the rule-based arms use the "
           "paper's two levels per layer (n_high rounded down), mc_moe solves its integer "
           "program, uniform is the largest single code within the budget (fewer bytes).",
           "- PTQ: round-to-nearest of the teacher at the arm's codes"
           + (f"; GPTQ of its experts at those codes (Hessians from {st['ptq_calib_batches']} "
              "training batches of the task slice through the teacher, capacity-dropped and "
              "padded tokens left out)" if GPTQ in st.get("ptq", ()) else "")
           + f". QAT: {st['qat_steps']} "
           f"steps of the config's joint objective from the teacher, {st['seeds']} seed(s) per "
           "arm (random: one order per seed); control: the same QAT with every expert at full "
           "precision, per seed.",
           f"- Eval: {ref['eval_examples']} held-out span-corruption examples of the task slice, "
           f"{ref['eval_tokens']:,} target tokens; bits per target token; top-1 routing "
           "agreement with the teacher (every sparse layer).", "",
           f"Teacher (fine-tuned, full precision): {ref['finetuned_fp_bits_per_byte']:.4f} bits per "
           f"target token; pretrained before the fine-tune: "
           f"{ref['pretrained_fp_bits_per_byte']:.4f} (top-1 agreement with the teacher "
           f"{ref['pretrained_top1_agree']:.3f}).  "]
  ctl = summ["controls"].get(OBJECTIVE)
  if ctl:
    lines.append(f"Control (full precision, same objective/steps/batches): "
                 f"{ctl['bits_per_byte']['mean']:.4f} bits per target token, Δ vs teacher "
                 f"{_pm(ctl['delta_vs_teacher'], ctl['delta_vs_teacher_se'])}, top-1 agreement "
                 f"{ctl['top1_agree']:.3f}.")
  lines += ["", f"## Arms at {b:g} {st['budget_unit']}", "",
            "Bits per target token (QAT: mean ± std over seeds); Δ ± the standard error paired "
            "over held-out examples (QAT: seed-averaged examples, each seed paired with its "
            "control's); agreement = top-1 routing agreement with the teacher.", "",
            "| arm | expert bytes | bits/w (scales) | codes | PTQ bits | PTQ Δ vs teacher | "
            "PTQ agree | QAT bits | QAT Δ vs teacher | QAT Δ vs control | QAT agree |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for m in st["methods"]:
    p = summ["ptq_table"].get(f"{RTN}|{m}|{b:g}")
    q = summ["table"].get(f"{OBJECTIVE}|{m}|{b:g}")
    a = data["allocations"][f"{m}|{b:g}|0"]
    ptq = (["-"] * 3 if p is None else
           [f"{p['bits_per_byte']['mean']:.4f}",
            _pm(p["delta_vs_teacher"], p["delta_vs_teacher_se"]),
            f"{p['topk_agree']['mean']:.3f}"])
    if q is None:
      qat = ["-"] * 4
    else:
      pq = q.get("paired", {})
      qat = [f"{q['bits_per_byte']['mean']:.4f} ± {q['bits_per_byte']['std']:.4f}",
             _pm(pq["delta_vs_teacher"], pq["delta_vs_teacher_se"]) if pq else "-",
             _pm(pq["delta_vs_control"], pq["delta_vs_control_se"]) if pq else "-",
             f"{q['top1_agree']['mean']:.3f}"]
    lines.append(f"| {m} | {a['bytes']:,} | {a['bits_per_weight']:.3f} | {_codes_text(a)} | "
                 + " | ".join(ptq + qat) + " |")
  lines += _gptq_lines(data, st, b)
  lines += ["", "## The paper's rule against each arm", "",
            "Δ = arm minus paper_combined in bits per target token (positive: paper_combined is "
            "better), ± the standard error paired over the held-out examples; QAT also per seed.",
            "z = Δ / its standard error.", "",
            "| arm | PTQ Δ | PTQ z | " + "".join(f"{PTQ_LABELS[x]} Δ | {PTQ_LABELS[x]} z | "
                                                for x in extra_ptq)
            + "QAT Δ | QAT z | QAT Δ per seed |",
            "|---|---|---|" + "---|---|" * len(extra_ptq) + "---|---|---|"]
  vs = summ.get("paper_vs_others", {})
  tests, identical = 0, []
  for m in st["methods"]:
    if m == "paper_combined":
      continue
    p, q = vs.get(RTN, {}).get(m), vs.get("qat", {}).get(m)
    more = [vs.get(x, {}).get(m) for x in extra_ptq]
    same = all(np.array_equal(data["allocations"][f"{m}|{b:g}|{s}"]["codes_LxE"],
                              data["allocations"][f"paper_combined|{b:g}|{s}"]["codes_LxE"])
               for s in range(st["seeds"]))
    if same:  # the same codes: the same runs, no comparison
      identical.append(m)
    else:
      tests += (p is not None) + (q is not None) + sum(r is not None for r in more)
    lines.append(f"| {m}{' (same codes)' if same else ''} | "
                 f"{_pm(p['delta'], p['delta_se']) if p else '-'} | {_z(p)} | "
                 + "".join(f"{_pm(r['delta'], r['delta_se']) if r else '-'} | {_z(r)} | "
                           for r in more)
                 + f"{_pm(q['delta'], q['delta_se']) if q else '-'} | {_z(q)} | "
                 + (", ".join(f"{d:+.4f}" for d in q["delta_by_seed"]) if q else "-") + " |")
  bonferroni = statistics.NormalDist().inv_cdf(1 - 0.025 / max(tests, 1))
  lines += ["", f"Multiplicity: this table makes {tests} comparisons (arms with paper_combined's "
            f"own codes left out{': ' + ', '.join(identical) if identical else ''}); at |z| > 1.96 "
            f"each, about {0.05 * tests:.1f} would pass by chance if no arm differed; Bonferroni "
            f"over {tests} asks |z| > {bonferroni:.2f}. The standard errors count example noise "
            "only (not seed, fine-tune or pretrain noise). Read a single pass as a lead to "
            "replicate, not a finding.", "", "## Who won", ""]
  w = summ["winners"].get(f"{OBJECTIVE}|{b:g}")
  if w:
    lines.append(_winner_line(f"- QAT at {b:g}: best **{w['best']}** ({w['best_bpb']:.4f} bits "
                              "per target token); ranking " + ", ".join(w["ranking"]), w)
                 .replace("bits/byte", "bits per target token"))
  for x in st.get("ptq", (RTN,)):
    ranks = sorted((r for r in summ["ptq_table"].values() if r["ptq"] == x),
                   key=lambda r: r["rank"])
    if ranks:
      lines.append(f"- PTQ ({PTQ_LABELS[x]}) at {b:g}: ranking " + ", ".join(
          f"{r['method']} {r['bits_per_byte']['mean']:.4f}" for r in ranks) + ".")
  lines += _lambda_noise_lines(summ.get("lambda_noise"), b)
  lines += ["", "Arms: " + "; ".join(f"{m} = {METHOD_LABELS.get(m, m)}" for m in st["methods"])
            + ".", ""]
  text = "\n".join(lines) + "\n"
  (pathlib.Path(workdir) / "study.md").write_text(text)
  return text


def _gptq_lines(data: dict, st: dict, b: float) -> list[str]:
  """The GPTQ rows' table: bits, Δ vs the teacher, agreement, GPTQ minus RTN at the same codes
  (paired over examples; random: seed-averaged) and GPTQ's calibration output error vs RTN's."""
  if GPTQ not in st.get("ptq", ()):
    return []
  summ, ref = data["summary"], np.asarray(data["reference"]["bits_per_window"])
  cells = data.get("ptq_cells", {})

  def windows(p, m):
    rows = [c["bits_per_window"] for c in cells.values()
            if c["ptq"] == p and c["method"] == m and c["budget"] == b]
    return np.mean(rows, axis=0) if rows else None

  lines = ["", f"## PTQ by GPTQ at {b:g} {st['budget_unit']}", "",
           "GPTQ of the teacher's experts at each arm's codes; Δ ± the standard error paired over "
           "held-out examples; calibration output error = sum over experts of "
           "(W - Q)^T H (W - Q), GPTQ's and round-to-nearest's on the same Hessians.", "",
           "| arm | GPTQ bits | Δ vs teacher | GPTQ − RTN | agree | calib. error GPTQ / RTN |",
           "|---|---|---|---|---|---|"]
  for m in st["methods"]:
    row = summ["ptq_table"].get(f"{GPTQ}|{m}|{b:g}")
    g, r = windows(GPTQ, m), windows(RTN, m)
    if row is None or g is None:
      continue
    vs_teacher = paired_difference(g, ref)
    vs_rtn = paired_difference(g, r) if r is not None else None
    errs = [c["calib_output_error"] for c in cells.values()
            if c["ptq"] == GPTQ and c["method"] == m and c.get("calib_output_error")]
    err = (f"{np.mean([e['gptq'] for e in errs]):.4g} / {np.mean([e['rtn'] for e in errs]):.4g}"
           if errs else "-")
    lines.append(f"| {m} | {row['bits_per_byte']['mean']:.4f} | {_pm(*vs_teacher)} | "
                 f"{_pm(*vs_rtn) if vs_rtn else '-'} | {row['topk_agree']['mean']:.3f} | {err} |")
  return lines


def rerender(workdir) -> str:
  """study.md again from WORKDIR/study.json (the summary recomputed), e.g. after a report change:
  python -m moeqjax.pipeline.switch_study WORKDIR."""
  workdir = pathlib.Path(workdir)
  data = json.loads((workdir / "study.json").read_text())
  data["summary"] = summarize(data)
  data["summary"]["paper_vs_others"] = paper_vs_others(data)
  return write_markdown(workdir, data)


if __name__ == "__main__":
  import sys
  print(rerender(sys.argv[1]))
