"""`moeqjax demo` on a Switch config: span-corruption teacher, control, RTN and QAT ternary, a mixed allocation, eval, pack, sample, compressed-tensors check."""

# Every phase is switch_phases' (the CLI's `pretrain`, `qat`, `ptq --method rtn`, `allocate`,
# `pack`), into workdir/<variant>/ like the decoder-only demo, so each folder is also a run the CLI
# reads (`moeqjax eval --workdir DEMO/qat_ternary --control DEMO/control`). Finished phases are
# reused, killed ones resumed. The demo-only `demo` section (configs/switch_tiny.py) may shorten
# pretraining and QAT for the demo alone; 0 keeps the config's steps.

from __future__ import annotations

import json
import pathlib
import time

import ml_collections
import numpy as np

from moeqjax.convert import runtimes
from moeqjax.data import make_tokenizer
from moeqjax.eval import plots
from moeqjax.model import init_ratios
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import switch_phases
from moeqjax.pipeline.allocate import allocate_workdir
from moeqjax.pipeline.demo import MIXED, MIXED_BUDGET, MIXED_METHOD
from moeqjax.pipeline.deploy import check_compressed_tensors
from moeqjax.pipeline.serve import switch_text
from moeqjax.pipeline.switch_phases import CONTROL, REFERENCE, UNIT
from moeqjax.pipeline.workdirs import load_data
from moeqjax.serve import load_packed, pack, switch_greedy
from moeqjax.serve.packed_source import PackedWeights
from moeqjax.train.metrics_log import read_metrics

# Variant name -> what it is; the keys are metrics.json["variants"]'s.
SWITCH_DEMO_VARIANTS = {
    REFERENCE: "the pretrained teacher (span corruption, or the pairs), no quantization",
    CONTROL: "the students' QAT objective, steps and batches at full precision "
             "(quant.expert_code=0), so extra training is not mistaken for a quantization gain",
    "rtn_ternary": "round-to-nearest ternary experts of the teacher (`ptq --method rtn`), no "
                   "training",
    "qat_ternary": "ternary experts after QAT with the joint objective (CE + MoE-block "
                   "reconstruction + logits KD + routing value + structure)",
    MIXED: f"per-expert codes ({MIXED_METHOD} allocation at {MIXED_BUDGET} code bits from the "
           f"{CONTROL} run's router statistics) after QAT with the same objective",
}
SERVED = "qat_ternary"  # packed, sampled and exported


def demo_steps(config) -> dict:
  """Applies the `demo` section (pretrain_steps, qat_steps; 0 or absent: the config's) to config
  in place, warmups clipped to the steps; returns the steps the demo runs."""
  demo = config.get("demo") or {}
  with config.unlocked():
    for phase in ("pretrain", "qat"):
      steps = int(demo.get(f"{phase}_steps", 0) or 0)
      if steps:
        config[phase].steps = steps
        config[phase].warmup_steps = min(int(config[phase].warmup_steps), steps)
  return {"pretrain_steps": int(config.pretrain.steps), "qat_steps": int(config.qat.steps)}


def _control_config(config):
  control = ml_collections.ConfigDict(config.to_dict())
  control.quant.expert_code = 0
  return control


def run_switch_demo(config, workdir: str | pathlib.Path) -> dict:
  """Runs the Switch pipeline into `workdir`; returns the metrics also written to metrics.json
  (with report.md and plots/)."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  steps = demo_steps(config)
  cfg = config_io.switch_config(config)
  timings, start = {}, time.perf_counter()

  def timed(name, fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    timings[name] = time.perf_counter() - t
    return out

  corpus = timed("data", load_data, config)
  teacher_dir = workdir / "pretrain"
  teacher = timed("pretrain", switch_phases.pretrain, config, teacher_dir, corpus, resume=True)
  provenance = {"teacher": str(teacher_dir.absolute())}

  def student(name, run_config, codes=None):
    state = timed(name, switch_phases.qat, run_config, workdir / name, corpus, teacher.params,
                  expert_codes_LxE=codes, resume=True, provenance=provenance)
    return {"params": state.params, "quant": state.quant}

  variants = {REFERENCE: {"params": teacher.params}}
  control = student(CONTROL, _control_config(config))
  # As `moeqjax eval --control` reads a control (switch_phases.evaluate_run).
  variants[CONTROL] = {"params": init_ratios(cfg, control["params"], control["quant"]),
                       "quant": control["quant"]}
  rtn, _ = timed("rtn_ternary", switch_phases.ptq_from_teacher, config, workdir / "rtn_ternary",
                 teacher_dir, "rtn", None, 1)
  variants["rtn_ternary"] = {"params": rtn.params, "quant": rtn.quant}
  variants["qat_ternary"] = student("qat_ternary", config)
  allocation, _ = allocate_workdir(_control_config(config), workdir / CONTROL, MIXED_METHOD,
                                   MIXED_BUDGET, "code_bits", choices=None, levels=None, seed=0,
                                   out=workdir / f"{MIXED}_allocation.json")
  variants[MIXED] = student(MIXED, config, np.asarray(allocation.codes_LxE))

  data = switch_phases.Seq2SeqData(config, cfg, corpus)
  batches = data.eval_batches()
  results = timed("eval", switch_phases.evaluate_variants, config, variants, batches,
                  control=CONTROL)
  if data.pairs is not None:  # summarization pairs: ROUGE of every variant, as `moeqjax eval`
    timed("rouge", switch_phases.add_rouge, config, data, variants, results, control=CONTROL)
  serving = timed("serve", demo_sample, cfg, workdir, variants[SERVED], batches[0],
                  config.data.tokenizer)
  deploy = timed("deploy", deploy_check, workdir, serving, batches[0])
  timings["total"] = time.perf_counter() - start
  curves = {"pretrain": read_metrics(teacher_dir / "metrics.jsonl")}
  for name in (CONTROL, "qat_ternary", MIXED):
    curves[name] = [dict(r, step=r["step"] + steps["pretrain_steps"])
                    for r in read_metrics(workdir / name / "metrics.jsonl")]
  metrics = {
      "model_family": "switch",
      "unit": UNIT,
      "steps": steps,
      "descriptions": SWITCH_DEMO_VARIANTS,
      "variants": results,
      "allocations": {MIXED: allocation.to_json()},
      "serving": serving,
      "deploy": deploy,
      "timings_s": timings,
      "notes": demo_notes(config, results, steps),
  }
  write_switch_report(workdir, metrics, curves, config_io.config_json(config))
  return metrics


def demo_notes(config, results: dict, steps: dict) -> list[str]:
  n = results[REFERENCE]["eval_examples"]
  pairs = switch_phases.pairs_path(config)
  examples = (f"(source, target) pairs of {pairs} (sources cut or padded to "
              f"{config.seq2seq.source_len}, targets to {config.seq2seq.target_len} tokens; the "
              f"last data.valid_fraction held out)" if pairs else
              f"span-corruption examples of {config.seq2seq.window} raw tokens (validation split)")
  unit = "examples" if pairs else "windows"
  return [
      f"Evaluation: {results[REFERENCE]['eval_tokens']:,} held-out target tokens in {n} "
      f"{examples}; Δs and drifts are paired over those examples (± one standard error).",
      f"Pretraining: {steps['pretrain_steps']} steps of {config.pretrain.batch_size} {unit}; QAT "
      f"(control and students): {steps['qat_steps']} steps of {config.qat.batch_size} {unit} "
      "from the teacher, on the training split.",
      "QAT continues training, so read the quantized rows against `control` (same objective, "
      "steps and batches, no quantization); `full_precision` is the teacher RTN starts from.",
      "Routing: top-1 agreement with the teacher's expert choice (mean over every sparse layer); "
      "drift = a student's agreement minus the control's. Capacity drops: the share of routed "
      "tokens over model.expert_capacity.",
      "Reused phases (already finished in this workdir) count ~0 s of wall time.",
  ]


def demo_sample(cfg, workdir: pathlib.Path, student: dict, batch, tokenizer_name: str) -> dict:
  """Packs the SERVED student (float32, so the packed model is the fake-quant one) and fills the
  spans of the first held-out example greedily from the packed folder."""
  folder = workdir / "packed" / SERVED
  tokenizer = make_tokenizer(tokenizer_name)
  manifest = pack(cfg, student["params"], student["quant"], folder,
                  tokenizer=tokenizer_name or None, eos_id=None, overwrite=True,
                  source=str((workdir / SERVED).absolute()))
  served = load_packed(folder)
  # The example's real source tokens only (pairs are right-padded), so the sample, and the
  # deploy check that reruns it unmasked, read no padding.
  enc = np.asarray(batch.encoder_ids[0])
  if batch.encoder_mask is not None:
    enc = enc[np.asarray(batch.encoder_mask[0], bool)]
  enc = enc[None]
  target = np.asarray(batch.targets[0])[np.asarray(batch.target_mask[0])]
  t = time.perf_counter()
  tokens = switch_greedy(served.model, served.variables, enc, len(target))[0]
  seconds = time.perf_counter() - t
  b = manifest["bytes"]
  return {
      "variant": SERVED, "folder": str(folder), "tensor_bytes": b["all_tensors"],
      "expert_tensor_bytes": b["expert_tensors_on_disk"],
      "expert_bits_per_weight": b["expert_bits_per_weight"],
      "encoder_ids": enc[0].tolist(), "tokens": tokens.tolist(),
      "input": switch_text(tokenizer, cfg.vocab_size, enc[0]),
      "target": switch_text(tokenizer, cfg.vocab_size, target),
      "generated": switch_text(tokenizer, cfg.vocab_size, tokens),
      "target_tokens_matched": int(np.sum(tokens == target)), "target_tokens": int(len(target)),
      "seconds": seconds,
  }


def deploy_check(workdir: pathlib.Path, serving: dict, batch) -> dict:
  """The packed SERVED student as compressed-tensors (from its stored codes), and, with the
  `export` extra, transformers' float32 logits against the packed model's on the sample
  (deploy.check_compressed_tensors: the decoder-only demo's check and bound)."""
  folder = pathlib.Path(serving["folder"])

  def logits_pair(model):
    served = load_packed(folder)
    enc = np.asarray([serving["encoder_ids"]])
    dec = np.asarray([[served.cfg.decoder_start_token_id, *serving["tokens"][:-1]]])
    ours = np.asarray(served.model.apply(served.variables, enc, dec)[0], np.float32)
    return runtimes.torch_seq2seq_logits(model, enc, dec), ours

  row = check_compressed_tensors(PackedWeights(folder),
                                 workdir / "deploy" / SERVED / "compressed-tensors", logits_pair)
  return {SERVED: {"compressed_tensors": row}}


def _pm(value, se, fmt="+.4f") -> str:
  if value is None:
    return "–"
  return f"{value:{fmt}}" + ("" if se is None else f" ± {se:.4f}")


def report_table(metrics: dict) -> list[str]:
  """The report's table: one row a variant."""
  lines = ["| variant | bits / target token | Δ vs teacher | Δ vs control | expert bits/weight "
           "| top-1 agree | drift vs control | capacity drops |",
           "|---|---|---|---|---|---|---|---|"]
  for name, r in metrics["variants"].items():
    lines.append(
        f"| `{name}` | {r['bits_per_token']:.4f} | "
        f"{_pm(r.get('delta_vs_teacher'), r.get('delta_vs_teacher_se'))} | "
        f"{_pm(r.get('delta_vs_control'), r.get('delta_vs_control_se'))} | "
        f"{r['expert_bits_per_weight']:.3f} | {r['top1_agree']:.3f} | "
        f"{_pm(r.get('drift_top1'), r.get('drift_top1_se'))} | {r['drop_rate']:.2%} |")
  return lines


def _on_pairs(metrics: dict) -> bool:
  """Whether the demo ran on (source, target) pairs: its variants then carry ROUGE."""
  return any("rouge" in r for r in metrics["variants"].values())


def rouge_table(metrics: dict) -> list[str]:
  """The ROUGE table of a demo on (source, target) pairs (none on span corruption)."""
  rows = {name: r["rouge"] for name, r in metrics["variants"].items() if "rouge" in r}
  if not rows:
    return []
  skipped = next((r["skipped"] for r in rows.values() if "skipped" in r), None)
  if skipped:
    return ["## ROUGE", "", f"Not scored: {skipped}", ""]
  lines = ["## ROUGE", "",
           f"Greedy summaries of {next(iter(rows.values()))['examples']} held-out pairs (at most "
           "seq2seq.target_len tokens) against their references; Δ ± the standard error paired "
           "over those examples.", "",
           "| variant | ROUGE-1 | ROUGE-2 | ROUGE-Lsum | Lsum Δ vs teacher | Lsum Δ vs control |",
           "|---|---|---|---|---|---|"]
  for name, r in rows.items():
    lines.append(
        f"| `{name}` | {r['rouge1']:.4f} | {r['rouge2']:.4f} | {r['rougeLsum']:.4f} | "
        f"{_pm(r.get('rougeLsum_delta_vs_teacher'), r.get('rougeLsum_delta_vs_teacher_se'))} | "
        f"{_pm(r.get('rougeLsum_delta_vs_control'), r.get('rougeLsum_delta_vs_control_se'))} |")
  return lines + [""]


def write_switch_report(workdir: pathlib.Path, metrics: dict, curves: dict, config_text: str):
  """report.md, metrics.json and plots/ (training curves, the mixed student's bit map)."""
  plot_dir = workdir / "plots"
  plot_dir.mkdir(parents=True, exist_ok=True)
  plots.plot_training_curves(curves, plot_dir / "training_curves.png", "target token")
  codes = metrics["variants"][MIXED]["expert_codes"]
  plots.plot_bit_map(codes, plot_dir / f"bit_map_{MIXED}.png",
                     f"{MIXED}: expert codes (rows: sparse layers, encoder first)")
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  s, ct = metrics["serving"], metrics["deploy"][SERVED]["compressed_tensors"]
  task = "summarization pairs" if _on_pairs(metrics) else "span corruption"
  lines = [f"# moeqjax demo: Switch Transformer (encoder-decoder, {task})", "",
           *report_table(metrics), "", *rouge_table(metrics),
           *[f"- `{name}`: {text}" for name, text in metrics["descriptions"].items()], "",
           *[f"- {note}" for note in metrics["notes"]], "",
           f"- `{MIXED}` rows (sparse layers, encoder first): "
           + "; ".join(" ".join(str(c) for c in row) for row in codes), "",
           "## Serving", "",
           f"`{s['variant']}` packed into `{s['folder']}`: {s['tensor_bytes']:,} tensor bytes, "
           f"expert tensors {s['expert_tensor_bytes']:,} bytes "
           f"({s['expert_bits_per_weight']:.3f} bits per weight with scales).", "",
           f"Greedy {'summary' if task != 'span corruption' else 'span filling'} of the first "
           "held-out example from the packed folder "
           f"({s['target_tokens_matched']} of {s['target_tokens']} target tokens matched, "
           f"{s['seconds']:.1f} s with compile):", "",
           "```", f"input:     {s['input']!r}", f"target:    {s['target']!r}",
           f"generated: {s['generated']!r}", "```", "",
           "## Deploy", "",
           f"compressed-tensors (`{ct['file'] or 'not written'}`"
           + (f", {ct['file_bytes']:,} bytes, {ct.get('expert_container')} experts" if ct["file"]
              else "") + f"): {ct['note']}.", "",
           "## Wall time (s)", "",
           ", ".join(f"{k} {v:.1f}" for k, v in metrics["timings_s"].items()), "",
           "![training curves](plots/training_curves.png)", "",
           "## Config", "", "```json", config_text, "```", ""]
  (workdir / "report.md").write_text("\n".join(lines))


def format_demo_summary(metrics: dict, workdir: pathlib.Path) -> str:
  """The CLI's summary: the eval table, the sample and the deploy check."""
  s, ct = metrics["serving"], metrics["deploy"][SERVED]["compressed_tensors"]
  sample = "summary" if _on_pairs(metrics) else "span filling"
  return "\n".join([
      switch_phases.format_summary(metrics["variants"], workdir).rsplit("\n", 1)[0],
      f"packed {s['variant']}: {s['tensor_bytes']:,} tensor bytes; greedy {sample} of a "
      f"held-out example ({s['target_tokens_matched']}/{s['target_tokens']} target tokens):",
      f"  input:     {s['input']!r}", f"  target:    {s['target']!r}",
      f"  generated: {s['generated']!r}",
      f"compressed-tensors: {ct['note']}",
      f"\nwall time {metrics['timings_s']['total']:.0f} s; report in {workdir / 'report.md'}"])
