"""study.md and the study's PNG plots (matplotlib Agg) from the study.json dict."""

from __future__ import annotations

import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moeqjax.alloc.rules import rule_bytes_text  # noqa: E402
from moeqjax.pipeline.study_summary import summarize  # noqa: E402

METHOD_LABELS = {"paper_combined": "paper combined (Lambda + V_s)",
                 "paper_router": "paper router-only (Lambda)",
                 "paper_router_reversed": "reversed Lambda (largest change first)",
                 "router_norm": "final router norm (paper's released-model proxy)",
                 "exact": "exact solver (ours)",
                 "frequency": "activation frequency", "gate_weight": "mean gate weight",
                 "mc_moe": "MC-MoE style", "uniform": "uniform", "random": "random order"}


def _fmt(s: dict, digits: int = 4) -> str:
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def plot_pareto(data: dict, path: pathlib.Path):
  summ = data["summary"]
  obj = summ["best_objective_at_main"]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for m in data["meta"]["settings"]["methods"]:
    rows = sorted([r for r in summ["table"].values() if r["objective"] == obj and r["method"] == m],
                  key=lambda r: r["budget"])
    if not rows:
      continue
    x = [r["expert_code_bits"]["mean"] for r in rows]
    y = [r["bits_per_byte"]["mean"] for r in rows]
    e = [r["bits_per_byte"]["std"] for r in rows]
    ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=METHOD_LABELS.get(m, m))
  # Peer rows (Qwix, CE only) are not on this plot: another objective, not like for like.
  ctrl = summ.get("controls", {}).get(obj) or data.get("controls", {}).get("fp_continued")
  if ctrl:
    ax.axhline(ctrl["bits_per_byte"]["mean"], color="k", linestyle=":",
               label=f"full precision, trained with objective '{obj}' (control)"
               if "objective" in ctrl else "full precision, continued for the QAT steps (control)")
  ref = data["reference"]["finetuned_fp_bits_per_byte"]
  ax.axhline(ref, color="gray", linestyle="--", label="full precision (fine-tuned)")
  ax.set_xlabel("average expert code bits per weight (scales excluded)")
  ax.set_ylabel("held-out bits per byte (task slice)")
  ax.set_title(f"Pareto over budgets, objective '{obj}' (mean ± std over seeds)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_routing(data: dict, path: pathlib.Path):
  summ = data["summary"]
  st = data["meta"]["settings"]
  main, obj = st["main_budget"], summ["best_objective_at_main"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, (key, names, title) in zip(axes, (
      ("method", st["methods"], f"methods, objective '{obj}'"),
      ("objective", list(st["objectives"]), "objectives, method 'paper_combined'"))):
    rows = []
    for n in names:
      want = (lambda r: r["objective"] == obj and r["method"] == n) if key == "method" else (
          lambda r: r["objective"] == n and r["method"] == "paper_combined")
      r = next((r for r in summ["table"].values() if r["budget"] == main and want(r)), None)
      if r is not None:
        rows.append((n, r["topk_agree_per_layer"]))
    if not rows:
      continue
    num_layers = len(rows[0][1])
    width = 0.8 / len(rows)
    for i, (n, per_layer) in enumerate(rows):
      ax.bar(np.arange(num_layers) + i * width, per_layer, width, label=n)
    ax.set_xticks(np.arange(num_layers) + 0.4 - width / 2)
    ax.set_xticklabels([f"layer {l}" for l in range(num_layers)])
    lo = min(min(p) for _, p in rows)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_ylabel("top-k agreement with full precision")
    ax.set_title(f"{title} @ {main:g} code bits", fontsize=9)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_bits_vs_sensitivity(data: dict, path: pathlib.Path):
  st = data["meta"]["settings"]
  main = st["main_budget"]
  lam = np.asarray(data["stats"]["lambda"])
  methods = [m for m in st["methods"] if m != "uniform"]
  cols = min(3, len(methods))
  rows_n = -(-len(methods) // cols)
  fig, axes = plt.subplots(rows_n, cols, figsize=(4 * cols, 3.2 * rows_n), squeeze=False)
  bits = {1: 1.6, 2: 2, 3: 3, 4: 4, 8: 8, 0: 16}
  for ax, m in zip(axes.ravel(), methods):
    a = data["allocations"].get(f"{m}|{main:g}|0")
    if a is None:
      continue
    codes = np.asarray(a["codes_LxE"])
    for l in range(codes.shape[0]):
      ax.scatter(lam[l], [bits[int(c)] for c in codes[l]], label=f"layer {l}", alpha=0.7)
    ax.set_title(METHOD_LABELS.get(m, m), fontsize=9)
    ax.set_xlabel("Lambda = router norm change (smaller = more sensitive)", fontsize=7)
    ax.set_ylabel("expert bits")
  for ax in axes.ravel()[len(methods):]:
    ax.axis("off")
  axes.ravel()[0].legend(fontsize=7)
  fig.suptitle(f"allocated bits vs sensitivity per expert @ {main:g} code bits (seed 0)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _winner_line(head: str, w: dict) -> str:
  """A "who won" bullet: the head, then the margins over the runner-up and over uniform."""
  text = head
  if "vs_second" in w:
    text += "; " + _noise_text(w["vs_second"])
  if "vs_uniform" in w:
    text += "; " + _noise_text(w["vs_uniform"]) + " (uniform spends fewer bytes)"
  return text + "."


def _noise_text(v: dict) -> str:
  if "t" not in v:
    return "one seed: no noise estimate"
  if v["margin_bpb"] == 0 and v["t"] == 0:
    return f"tied with {v['method']} (identical allocation)"
  verdict = "beats seed noise" if v["beats_noise"] else "within seed noise"
  return (f"ahead of {v['method']} by {v['margin_bpb']:.4f} bits/byte (paired over {v['n']} "
          f"seeds, t = {v['t']:.2f}, 95% threshold {v['t95']:.2f}: {verdict})")


def write_markdown(workdir: pathlib.Path, data: dict) -> str:
  st = data["meta"]["settings"]
  summ = data["summary"]
  ref = data["reference"]
  main = st["main_budget"]
  obj_best = summ["best_objective_at_main"]
  levels = st.get("levels") or ()  # study.json files written before study.levels existed have none
  lines = [f"# Allocation x objective study ({'QUICK grid' if st['quick'] else 'default grid'})", ""]
  if st["quick"]:
    lines += ["**This is the `--quick` grid** (fewer seeds, objectives, budgets and QAT steps), not the "
              "default grid.", ""]
  cmd = data.get("command", "moeqjax study --config configs/study_tiny.py"
                 + (" --quick" if st["quick"] else ""))
  lines += [f"Command: `{cmd}`  ", f"Machine: {data['meta']['machine']}  ",
            "Wall time per invocation (cached phases and finished cells are reused on reruns): "
            + ", ".join(f"{i['seconds'] / 60:.1f} min ({i['new_cells']} new cells)"
                        for i in data.get("invocations", [])), ""]
  tc, pc = data["meta"]["task_corpus"], data["meta"]["pretrain_corpus"]
  lines += ["## Protocol", "",
            f"- Pretraining slice: stdlib {', '.join(data['meta']['pretrain_slice'])} "
            f"({pc['train_files']} train files, {pc['train_bytes']:,} bytes).",
            f"- Fine-tuning task: a DIFFERENT slice, stdlib packages "
            f"{', '.join(data['meta']['task_slice'])} ({tc['train_files']} train / {tc['valid_files']} "
            f"held-out files, {tc['train_bytes']:,} / {tc['valid_bytes']:,} bytes).",
            f"- Router statistics: a {st['finetune_steps']}-step full-precision fine-tune of the "
            "pretrained model on the task slice; the jitted train step accumulates them (no extra "
            "pass). Lambda_s = ||w_s(T)|| - ||w_s(0)|| over this fine-tune (T = its end). A second, "
            "independent fine-tune (other batches, same start) gives a second Lambda, so Lambda's "
            "own noise shows (below); the cells use the first.",
            "- Allocation from those statistics at equal expert weight bytes. " + rule_bytes_text(
                f"{levels[0]},{levels[1]} (study.levels)" if levels else
                f"the two codes of {list(st['choices'])} whose bytes bracket B (study.levels is "
                "empty)") + " The exact solver (multiple-choice knapsack over "
            f"codes {list(st['choices'])}; cost = rank weight of Lambda, (E - rank)/E with the most "
            "sensitive = 1, times the relative weight MSE of the expert at that code) and MC-MoE "
            "(frequency x gate^1.5 x MSE, same solver) never exceed the same byte budget. Uniform "
            "is the largest single code within it (fewer bytes: not like for like).",
            f"- QAT: {st['qat_steps']} steps on the task slice from the fine-tuned model (the frozen "
            "teacher), one compiled step per objective, the codes swapped as data across methods "
            "and seeds. Seeds change the QAT batches (and the random order).",
            f"- Evaluation: {ref['eval_tokens']:,} held-out bytes of the task slice; bits per byte; "
            "top-k agreement of routing with the fine-tuned full-precision model.",
            f"- Budgets are average expert code bits per weight ({st['budget_unit']}: scales "
            "excluded; the tables also give bits with scales). Integer budgets (2/3/4) would make "
            "every rule-based method identical to uniform, and 1.6 is below all-ternary once "
            "packing rounds up, so the sweep uses "
            f"{', '.join(f'{b:g}' for b in st['pareto_budgets'])}.", "",
            f"Full precision: pretrained {ref['pretrained_fp_bits_per_byte']:.4f}, fine-tuned "
            f"{ref['finetuned_fp_bits_per_byte']:.4f} bits per byte on the task's held-out files."]
  controls = summ.get("controls", {})
  for o, c in controls.items():
    lines.append(f"Control for objective '{o}': the teacher trained with that QAT objective "
                 f"(knowledge distillation and the routing terms as weighted there), the same "
                 f"{st['qat_steps']} steps and batches, every expert at full precision: "
                 f"{_fmt(c['bits_per_byte'])} bits per byte, Δ vs teacher "
                 f"{_pm(c['delta_vs_teacher'], c['delta_vs_teacher_se'])}, top-k agreement with "
                 f"the teacher {c['topk_agree']:.3f}, top-1 {c['top1_agree']:.3f}.  ")
  ctrl = data.get("controls", {}).get("fp_continued")
  if ctrl and not controls:  # a study.json written before the same-objective controls
    lines.append(f"Control: the fine-tuned model trained on in full precision for the same "
                 f"{st['qat_steps']} steps (CE, same batches as QAT): "
                 f"{_fmt(ctrl['bits_per_byte'])} bits per byte. QAT runs also train on the task "
                 "for those steps, so compare them with this control, not with the teacher.")
  lines.append("")

  # Winners in plain words.
  lines += ["## Who won", ""]
  for o in st["objectives"]:
    w = summ["winners"].get(f"{o}|{main:g}")
    if w:
      lines.append(_winner_line(
          f"- Budget {main:g}, objective **{o}**: best **{w['best']}** ({w['best_bpb']:.4f} "
          "bits/byte)", w))
  n_tests = summ.get("comparisons")
  if n_tests:
    lines += ["", f"Multiplicity: these lines make {n_tests} paired tests at the 95% level, so "
              f"about {0.05 * n_tests:.1f} false \"beats seed noise\" verdicts are expected if no "
              "method differed; and each winner is the best of "
              f"{len(st['methods'])} methods picked after seeing the results, which biases its "
              "margin upward. Read a single \"beats noise\" as a lead to replicate, not a finding."]
  lines += _lambda_noise_lines(summ.get("lambda_noise"), main)
  om = summ["objective_mean_bpb_at_main"]
  lines += ["", "Objectives averaged over methods at the main budget: " + ", ".join(
      f"{o} {v:.4f}" for o, v in sorted(om.items(), key=lambda kv: kv[1]))
      + f" bits/byte; best: **{obj_best}**.", ""]
  for b in st["pareto_budgets"]:
    w = summ["winners"].get(f"{obj_best}|{b:g}")
    if w and b != main:
      lines.append(_winner_line(
          f"- Budget {b:g}, objective {obj_best}: best **{w['best']}** ({w['best_bpb']:.4f})", w))
  lines.append("")

  # Main grid table.
  lines += [f"## Method x objective at {main:g} code bits (mean ± std over {st['seeds']} seeds)", "",
            "| method | " + " | ".join(st["objectives"]) + " | expert bytes | bits/w (with scales) |",
            "|---|" + "---|" * (len(st["objectives"]) + 2)]
  for m in st["methods"]:
    cells, extra = [], None
    for o in st["objectives"]:
      r = summ["table"].get(f"{o}|{m}|{main:g}")
      cells.append(_fmt(r["bits_per_byte"]) if r else "-")
      extra = r or extra
    note = " (fewer bytes: not like for like)" if m == "uniform" else ""
    lines.append(f"| {m}{note} | " + " | ".join(cells) + " | "
                 + (f"{extra['expert_bytes']['mean']:.0f} | {extra['expert_bits_per_weight']['mean']:.3f}"
                    if extra else "- | -") + " |")
  lines += ["", "Cells are held-out bits per byte (lower is better).", ""]
  lines += [f"### Top-k routing agreement at {main:g} code bits", "",
            "| method | " + " | ".join(st["objectives"]) + " |", "|---|" + "---|" * len(st["objectives"])]
  for m in st["methods"]:
    cells = []
    for o in st["objectives"]:
      r = summ["table"].get(f"{o}|{m}|{main:g}")
      cells.append(_fmt(r["topk_agree"], 3) if r else "-")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines.append("")

  lines += _paired_section(summ, st)

  # Pareto table.
  lines += [f"## Budget sweep, objective '{obj_best}'", "",
            "| method | " + " | ".join(f"{b:g}" for b in st["pareto_budgets"]) + " |",
            "|---|" + "---|" * len(st["pareto_budgets"])]
  for m in st["methods"]:
    cells = []
    for b in st["pareto_budgets"]:
      r = summ["table"].get(f"{obj_best}|{m}|{b:g}")
      cells.append(f"{_fmt(r['bits_per_byte'])} @ {r['expert_code_bits']['mean']:.2f}b/"
                   f"{r['expert_bytes']['mean']:.0f}B" if r else "-")
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  lines += ["", "Each cell: bits per byte @ achieved code bits / expert bytes.", ""]

  lines += _ptq_section(summ.get("ptq_table", {}), st)

  peers = data.get("peers", {})
  lines += ["## Peer rows: Qwix QAT", ""]
  if peers:
    lines += ["| row | bits/byte | expert code bits | like for like? |", "|---|---|---|---|"]
    for name, p in peers.items():
      if "error" in p:
        lines.append(f"| {name} | not run: {p['error']} | - | - |")
      else:
        lines.append(f"| {name} | {_fmt(p['bits_per_byte'])} | {p['expert_code_bits']:.2f} | "
                     f"{p['like_for_like']} |")
  else:
    lines.append("Not run in this grid (study.peers off, or qwix not installed).")
  lines += ["", "## Plots", "", "![pareto](pareto.png)", "", "![routing](routing_per_layer.png)", "",
            "![bits vs sensitivity](bits_vs_sensitivity.png)", ""]
  text = "\n".join(lines) + "\n"
  (workdir / "study.md").write_text(text)
  return text


def _lambda_noise_lines(noise: dict | None, main: float) -> list[str]:
  """Lambda from two independent fine-tunes: rank agreement and how many codes it moves."""
  if not noise:
    return []
  rho = ", ".join(f"{v:.2f}" for v in noise["lambda_spearman_per_layer"])
  rho_norm = ", ".join(f"{v:.2f}" for v in noise["router_norm_spearman_per_layer"])
  moved = ", ".join(f"{k.split('|')[0]} {v:.0%}" for k, v in noise["codes_changed"].items()
                    if float(k.split("|")[1]) == main)
  return ["", "Lambda's own noise (two independent fine-tunes from the same start): Spearman rank "
          f"correlation of the two Lambdas per layer {rho} (of the final router norms: {rho_norm}); "
          f"share of experts whose code changes when each method reads the second fine-tune's "
          f"statistics instead of the first's, at {main:g} code bits: {moved}."]


def _pm(value: float, se: float | None, digits: int = 4) -> str:
  """A signed value ± its standard error (none with one window)."""
  text = f"{value:+.{digits}f}"
  return text if se is None else f"{text} ± {se:.{digits}f}"


def _paired_section(summ: dict, st: dict) -> list[str]:
  """Every row at the main budget against the teacher and its objective's control."""
  main = st["main_budget"]
  rows = [r for r in summ["table"].values() if r["budget"] == main and "paired" in r]
  if not rows:
    return []
  lines = [f"### Against the teacher and the same-objective control at {main:g} code bits", "",
           "Δ is held-out bits per byte minus the teacher's, or minus the full-precision control's "
           "trained with the row's objective, steps and batches; drift is the row's routing "
           "agreement with the teacher minus the control's (the quantization-only drift; negative: "
           "quantization moved routing beyond what the fine-tuning moved it). Values average the "
           "seeds, each paired with the control of its seed; ± is the standard error paired over "
           "the evaluation windows (window noise only; the spread over seeds is in study.json, "
           "`summary.table.*.paired.*_by_seed`).", "",
           "| objective | method | Δ vs teacher | Δ vs control | top-k agree | control top-k | "
           "top-k drift | top-1 drift |", "|---|---|---|---|---|---|---|---|"]
  for o in st["objectives"]:
    for m in st["methods"]:
      r = next((r for r in rows if r["objective"] == o and r["method"] == m), None)
      if r is None:
        continue
      p = r["paired"]
      lines.append(f"| {o} | {m} | {_pm(p['delta_vs_teacher'], p['delta_vs_teacher_se'])} | "
                   f"{_pm(p['delta_vs_control'], p['delta_vs_control_se'])} | "
                   f"{p['topk_agree']:.3f} | {p['control_topk_agree']:.3f} | "
                   f"{_pm(p['drift_topk'], p['drift_topk_se'], 3)} | "
                   f"{_pm(p['drift_top1'], p['drift_top1_se'], 3)} |")
  return lines + [""]


def _ptq_section(table: dict, st: dict) -> list[str]:
  """Post-training rows: bits per byte of each allocation at each budget, by RTN and by GPTQ."""
  if not table:
    return []
  budgets = sorted({r["budget"] for r in table.values()})
  lines = ["## Post-training quantization (no training)", "",
           "The fine-tuned teacher quantized at each allocation's codes, by round-to-nearest (rtn) "
           f"or by GPTQ per expert (gptq, Hessians from {st.get('ptq_calib_batches', 8)} task "
           "batches routed by the teacher, on the full 2^b-level grid; both use the config's "
           "quant.scale_init). One run each (random: mean ± std over its seeds). "
           "Cell: bits per byte (rank among the methods at that budget).", "",
           "| ptq | method | " + " | ".join(f"{b:g}" for b in budgets) + " |",
           "|---|---|" + "---|" * len(budgets)]
  for p in st.get("ptq", ()):
    for m in st["methods"]:
      cells = []
      for b in budgets:
        r = table.get(f"{p}|{m}|{b:g}")
        if r is None:
          cells.append("-")
        else:  # one run: no spread to show
          value = (_fmt(r["bits_per_byte"]) if len(r["seeds"]) > 1
                   else f"{r['bits_per_byte']['mean']:.4f}")
          cells.append(f"{value} ({r['rank']})")
      lines.append(f"| {p} | {m} | " + " | ".join(cells) + " |")
  lines.append("")
  paired = [r for r in table.values() if "delta_vs_teacher" in r]
  if not paired:
    return lines
  lines += ["Against the teacher and against uniform at the same PTQ method and budget (held-out "
            "bits per byte; ± the standard error paired over the evaluation windows: window noise "
            "only, since a post-training row has no training seed; random averages its seeds' "
            "windows). A rank is a difference only where its Δ vs uniform is beyond about two "
            "standard errors.", "",
            "| ptq | method | budget | Δ vs teacher | Δ vs uniform |", "|---|---|---|---|---|"]
  for r in sorted(paired, key=lambda r: (r["ptq"], r["budget"], r["rank"])):
    vs_uniform = (_pm(r["delta_vs_uniform"], r["delta_vs_uniform_se"])
                  if "delta_vs_uniform" in r else "-")
    lines.append(f"| {r['ptq']} | {r['method']} | {r['budget']:g} | "
                 f"{_pm(r['delta_vs_teacher'], r['delta_vs_teacher_se'])} | {vs_uniform} |")
  return lines + [""]


def write_outputs(workdir: pathlib.Path, data: dict):
  plot_pareto(data, workdir / "pareto.png")
  plot_routing(data, workdir / "routing_per_layer.png")
  plot_bits_vs_sensitivity(data, workdir / "bits_vs_sensitivity.png")
  write_markdown(workdir, data)


if __name__ == "__main__":  # re-render from an existing study.json
  import sys
  d = pathlib.Path(sys.argv[1])
  loaded = json.loads((d / "study.json").read_text())
  loaded["summary"] = summarize(loaded)
  write_outputs(d, loaded)
