"""The demo report: a markdown table, metrics.json with stable keys, and PNG plots."""

from __future__ import annotations

import json
import pathlib

from moeqjax.eval import plots
from moeqjax.eval.variants import REFERENCE

CONTROL = "fp_continued"  # full precision trained as long as the QAT runs (its column needs it)

# Columns of the report table: (header, metrics key, format).
TABLE = (
    ("bits/{unit}", "bits_per_token", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),  # shown for unit "token" only (see _columns)
    ("Δ vs FP teacher (± paired s.e.)", "delta_vs_fp", "{:+.4f}"),
    ("Δ vs FP-continued control (± paired s.e.)", "delta_vs_" + CONTROL, "{:+.4f}"),
    ("avg expert bits (codes)", "expert_code_bits", "{:.2f}"),
    ("expert bits/weight (+scales)", "expert_bits_per_weight", "{:.3f}"),
    ("expert weight bytes", "expert_bytes", "{:,}"),
    ("model bits/weight", "model_bits_per_weight", "{:.3f}"),
    ("top-k agree", "topk_agree", "{:.3f}"),
    ("top-1 agree", "top1_agree", "{:.3f}"),
    ("control top-k agree", "control_topk_agree", "{:.3f}"),
    # Quantization-only drift: the row's agreement minus the control's (paired over windows).
    ("top-k drift vs control (± paired s.e.)", "drift_topk", "{:+.3f}"),
    ("top-1 drift vs control (± paired s.e.)", "drift_top1", "{:+.3f}"),
    ("changed frac", "changed_frac", "{:.3f}"),
    ("load KL", "load_kl", "{:.4f}"),
)


def _columns(unit: str, results: dict) -> tuple:
  # Perplexity per byte is a number nobody compares against; per token it is the usual LM metric.
  # metrics.json always has the key. The control columns need a control variant; rows without a
  # column's key (the teacher and the control have no drift against the control) show "-".
  have = set.union(*(set(r) for r in results.values()))
  return tuple(c for c in TABLE if (unit == "token" or c[1] != "perplexity") and c[1] in have)


def _cell(r: dict, key: str, fmt: str) -> str:
  if key not in r:
    return "-"
  text = fmt.format(r[key])
  se = r.get(key + "_se")
  return text if se is None or r[key] == 0.0 and se == 0.0 else f"{text} ± {se:.4f}"


def _table(results: dict, unit: str, descriptions: dict) -> str:
  columns = _columns(unit, results)
  head = ["variant"] + [h.format(unit=unit) for h, _, _ in columns]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in results.items():
    cells = [f"`{name}`"] + [_cell(r, key, fmt) for _, key, fmt in columns]
    lines.append("| " + " | ".join(cells) + " |")
  lines.append("")
  lines += [f"- `{name}`: {text}" for name, text in descriptions.items()]
  return "\n".join(lines)


def _serving_section(serving: dict | None) -> list[str]:
  if not serving:
    return []
  lines = ["## Serving from packed weights", "",
           "| variant | packed tensors (bytes) | expert tensors on disk | expert bytes (accounting) "
           "| full-precision bf16 model | bf16 / packed |", "|---|---|---|---|---|---|"]
  for name, r in serving["packed"].items():
    lines.append(f"| `{name}` | {r['tensor_bytes']:,} | {r['expert_tensor_bytes']:,} | "
                 f"{r['expert_bytes_accounted']:,} | {r['fp_bf16_model_bytes']:,} | "
                 f"{r['fp_bf16_over_packed']:.2f}x |")
  s = serving["sample"]
  lines += ["", f"Greedy continuation of a held-out prompt by the packed `{s['variant']}` model "
            f"(KV cache; prefill {s['prefill_tokens_per_s']:,.0f} tok/s, decode "
            f"{s['decode_tokens_per_s']:,.1f} tok/s on this machine):", "",
            "```text", s["prompt"] + "│" + s["continuation"], "```",
            "(│ marks where the prompt ends.)", ""]
  return lines


_DEPLOY_FORMATS = {"gguf": "GGUF (llama.cpp)", "compressed_tensors": "compressed-tensors (vLLM)"}


def _deploy_section(deploy: dict | None) -> list[str]:
  if not deploy:
    return []
  lines = ["## Deploy: the packed students in other runtimes", "",
           "| variant | format | file bytes | loaded | matched | check | GGUF expert bytes "
           "(packed) | tensors widened |", "|---|---|---|---|---|---|---|---|"]
  yes_no = {True: "yes", False: "**no**", None: "-"}
  for name, formats in deploy.items():
    for key, r in formats.items():
      size = f"{r['file_bytes']:,}" if r["file_bytes"] is not None else "-"
      experts = (f"{r['expert_bytes']:,} ({r['expert_bytes_packed']:,})"
                 if r.get("expert_bytes") is not None else "-")
      widened = str(len(r["widened"])) if r.get("widened") is not None else "-"
      lines.append(f"| `{name}` | {_DEPLOY_FORMATS[key]} | {size} | {yes_no[r['loaded']]} | "
                   f"{yes_no[r['matched']]} | {r['note']} | {experts} | {widened} |")
  return lines + ["", "Exported from the packed folders (their stored codes and scales, nothing "
                  "re-quantized); each export's report (`model.export_report.json` beside the GGUF, "
                  "`export_report.json` in the compressed-tensors folder) says where a runtime "
                  "stores experts wider than our packing. `GGUF expert bytes` are the expert tensors' "
                  "bytes in the file, beside (in parentheses) our packed checkpoint's bytes of "
                  "them; `tensors widened` counts the GGUF tensors stored in a type wider than one "
                  "of their codes' own (llama.cpp holds one type per expert tensor, so a "
                  "per-expert mix takes its widest code's; ternary without TQ blocks is widened to "
                  "Q4_0; int2 and int3, which have no ggml type, take Q4_0 without counting as "
                  "widened).", ""]


def capacity_note(results: dict) -> str | None:
  """One line saying how many routed pairs the capacity dropped in evaluation (None: dropless)."""
  rates = {name: r["drop_rate"] for name, r in results.items() if r.get("drop_rate") is not None}
  if not rates:
    return None
  shares = ", ".join(f"{name} {rate:.2%}" for name, rate in rates.items())
  return ("The expert capacity (model.capacity_factor, per sequence, 1st choices first) dropped "
          f"these shares of the routed (token, expert) pairs in evaluation: {shares}. Generation "
          "decodes one token per step, which never overflows a capacity, so only its prompt's "
          "prefill drops pairs: decoded text is not scored under the same drops.")


def write_report(workdir: pathlib.Path, results: dict, *, descriptions: dict, baseline: float,
                 fingerprint: dict, unit: str, curves: dict, timings: dict, notes: list[str],
                 config_text: str, serving: dict | None = None,
                 deploy: dict | None = None, allocations: dict | None = None,
                 skipped: dict | None = None) -> dict:
  """Writes report.md, metrics.json and plots/*.png into workdir; returns the metrics dict.

  `serving` (optional) is what moeqjax.pipeline.demo.demo_serving returned: packed bytes and a sample;
  `deploy` (optional) is what moeqjax.pipeline.deploy.deploy_packed returned.
  `allocations` (optional): variant -> its allocation.json record (Allocation.to_json()); each is
  kept in metrics.json["allocations"] and drawn as plots/bit_map_<variant>.png.
  `skipped` (optional): variant -> the one line saying why it was not run (metrics.json["skipped"];
  the caller puts the line in `notes` too).
  """
  workdir = pathlib.Path(workdir)
  plot_dir = workdir / "plots"
  plot_dir.mkdir(parents=True, exist_ok=True)
  ref = results[REFERENCE]["bits_per_token"]
  metrics = {
      "unit": unit,
      "unigram_bits_per_token": baseline,
      "data": fingerprint,
      "variants": results,
      "timings_s": timings,
  }
  if serving:
    metrics["serving"] = serving
  if deploy:
    metrics["deploy"] = deploy
  allocations = allocations or {}
  if allocations:
    metrics["allocations"] = allocations
  if skipped:
    metrics["skipped"] = skipped
  (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
  plots.plot_training_curves(curves, plot_dir / "training_curves.png", unit)
  plots.plot_variants(results, baseline, plot_dir / "variants.png", unit)
  plots.plot_routing(results, plot_dir / "routing_per_layer.png", REFERENCE)
  for name, record in allocations.items():
    what = ("codes per (layer, projection) tensor" if record.get("target") == "gguf"
            else "expert codes")
    plots.plot_bit_map(record["codes_LxE"], plot_dir / f"bit_map_{name}.png",
                       f"{name}: {what} ({record['method']}, "
                       f"{record['achieved']['code_bits']:.2f} code bits)")
  data_line = ", ".join(f"{k}={v}" for k, v in fingerprint.items())
  text = "\n".join([
      "# moeqjax demo report",
      "",
      f"Held-out data: {data_line}.",
      "",
      f"Unigram {unit} model (train unigram, Laplace smoothing) on the held-out split: "
      f"**{baseline:.4f} bits/{unit}**. Full-precision MoE: **{ref:.4f} bits/{unit}**"
      + (f" (perplexity {results[REFERENCE]['perplexity']:.2f} per token)." if unit == "token"
         else "."),
      "",
      _table(results, unit, descriptions),
      "",
      "Routing metrics compare each variant's top-k expert sets with the full-precision model "
      "on the same held-out tokens. Memory counts packed weights plus fp16 scales (and zero "
      "points); unquantized tensors count at bf16. Each Δ is given ± its standard error paired "
      "over the evaluation windows (both variants score the same windows; the windows are "
      "treated as independent): a Δ within about two standard errors of 0 is noise.",
      "",
      f"The control `{CONTROL}` is the teacher fine-tuned with the QAT rows' objective (knowledge "
      "distillation and the routing terms included), steps and batches at full precision, so "
      "fine-tuning alone moves its routing too: `control top-k agree` is its agreement with the "
      "teacher, and each row's top-k / top-1 drift is its agreement minus the control's, paired "
      "over windows (the quantization-only drift; negative: quantization moved routing further). "
      "The RTN rows are not fine-tuned: their drift against the unchanged teacher is their "
      "agreement minus 1.",
      "",
      *[f"- {n}" for n in notes + [capacity_note(results)] if n],
      "",
      *_serving_section(serving),
      *_deploy_section(deploy),
      "## Wall time (s)",
      "",
      *[f"- {k}: {v:.1f}" for k, v in timings.items()],
      "",
      "## Plots",
      "",
      "![training curves](plots/training_curves.png)",
      "![variants](plots/variants.png)",
      "![routing per layer](plots/routing_per_layer.png)",
      *[f"![bit map of {name}](plots/bit_map_{name}.png)" for name in allocations],
      "",
      "## Config",
      "",
      "```json",
      config_text,
      "```",
      "",
  ])
  (workdir / "report.md").write_text(text)
  return metrics
