"""The Switch demo's report assembly and its demo-only step settings (the whole demo takes minutes:
docs/guides/training.md has its measured run)."""

import json

from moeqjax.pipeline.config import load_config
from moeqjax.pipeline.switch_demo import (SWITCH_DEMO_VARIANTS, demo_steps, format_demo_summary,
                                          write_switch_report)

from switch_micro import REPO


def _row(bits, delta=None, control=None, agree=1.0, code_bits=16.0):
  r = {"bits_per_token": bits, "expert_bits_per_weight": code_bits, "top1_agree": agree,
       "drop_rate": 0.05, "eval_examples": 32, "expert_codes": [[1, 2], [3, 1]]}
  if delta is not None:
    r.update(delta_vs_teacher=delta, delta_vs_teacher_se=0.01)
  if control is not None:
    r.update(delta_vs_control=control, delta_vs_control_se=0.002, control_top1_agree=0.99,
             drift_top1=agree - 0.99, drift_top1_se=0.003)
  return r


def test_demo_steps_shorten_the_demo_only():
  config = load_config(REPO / "configs" / "switch_tiny.py")
  want = dict(config.demo)
  steps = demo_steps(config)
  assert steps == {"pretrain_steps": want["pretrain_steps"] or 600,
                   "qat_steps": want["qat_steps"] or 150}
  assert config.pretrain.warmup_steps <= config.pretrain.steps == steps["pretrain_steps"]
  with config.unlocked():
    config.demo.pretrain_steps, config.demo.qat_steps = 0, 7
  config.qat.steps = 150
  assert demo_steps(config)["qat_steps"] == 7 and config.qat.warmup_steps == 7


def test_report_and_summary(tmp_path):
  variants = {"full_precision": _row(3.5), "control": _row(3.4, -0.1, None, 0.99),
              "rtn_ternary": _row(4.0, 0.5, 0.6, 1.0, 2.25),
              "qat_ternary": _row(3.45, -0.05, 0.05, 0.97, 2.25),
              "qat_mixed": _row(3.41, -0.09, 0.01, 0.98, 2.75)}
  metrics = {
      "model_family": "switch", "unit": "target token", "descriptions": SWITCH_DEMO_VARIANTS,
      "variants": variants, "notes": ["a note"], "timings_s": {"pretrain": 1.0, "total": 2.0},
      "serving": {"variant": "qat_ternary", "folder": "P", "tensor_bytes": 1000,
                  "expert_tensor_bytes": 100, "expert_bits_per_weight": 2.25, "input": "a<x>",
                  "target": "<x>b", "generated": "<x>c", "target_tokens_matched": 1,
                  "target_tokens": 2, "seconds": 0.5},
      "deploy": {"qat_ternary": {"compressed_tensors": {
          "file": "F", "file_bytes": 10, "expert_container": "int2", "note": "within 1e-06"}}},
  }
  curves = {"pretrain": [{"step": s, "train/task": 2.0 - s / 10} for s in range(5)],
            "qat_ternary": [{"step": 5 + s, "train/task": 1.6} for s in range(3)]}
  write_switch_report(tmp_path, metrics, curves, "{}")
  report = (tmp_path / "report.md").read_text()
  assert "| `qat_ternary` | 3.4500 | -0.0500 ± 0.0100 | +0.0500 ± 0.0020 | 2.250 | 0.970 | " \
         "-0.0200 ± 0.0030 | 5.00% |" in report
  assert "| `full_precision` | 3.5000 | – | – |" in report
  assert "1 of 2 target tokens matched" in report and "int2 experts" in report
  assert json.loads((tmp_path / "metrics.json").read_text())["variants"] == variants
  for png in ("training_curves.png", "bit_map_qat_mixed.png"):
    assert (tmp_path / "plots" / png).stat().st_size > 0
  summary = format_demo_summary(metrics, tmp_path)
  assert "qat_ternary: Δ bits/target token vs teacher -0.0500 ± 0.0100, vs control +0.0500" \
      in summary
  assert "compressed-tensors: within 1e-06" in summary and "results in" not in summary


def test_hf_dir_is_refused_in_one_line(tmp_path, capsys):
  from moeqjax.cli import main
  argv = ["demo", "--config", str(REPO / "configs" / "switch_tiny.py"), "--hf-dir",
          str(tmp_path), "--workdir", str(tmp_path / "demo")]
  assert main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("moeqjax: error:") and "\n" not in err and "drop --hf-dir" in err
  assert not (tmp_path / "demo").exists()


def test_report_on_pairs_has_the_rouge_table(tmp_path):
  """A demo on (text, summary) pairs: its report names the task and has every variant's ROUGE,
  with the paired differences add_rouge wrote."""
  rouge = lambda r1, d=None: {"rouge1": r1, "rouge2": r1 / 2, "rougeLsum": r1 - 0.01,
                              "examples": 64, **({} if d is None else {
                                  "rougeLsum_delta_vs_teacher": d,
                                  "rougeLsum_delta_vs_teacher_se": 0.004})}
  variants = {"full_precision": {**_row(3.5), "rouge": rouge(0.31)},
              "qat_ternary": {**_row(3.45, -0.05), "rouge": rouge(0.29, -0.02)},
              "qat_mixed": {**_row(3.41, -0.09), "rouge": rouge(0.30, -0.01)}}
  metrics = {
      "model_family": "switch", "unit": "target token", "descriptions": SWITCH_DEMO_VARIANTS,
      "variants": variants, "notes": [], "timings_s": {"total": 2.0},
      "serving": {"variant": "qat_ternary", "folder": "P", "tensor_bytes": 1000,
                  "expert_tensor_bytes": 100, "expert_bits_per_weight": 2.25, "input": "a",
                  "target": "b", "generated": "c", "target_tokens_matched": 0,
                  "target_tokens": 1, "seconds": 0.5},
      "deploy": {"qat_ternary": {"compressed_tensors": {"file": None, "note": "not written"}}}}
  write_switch_report(tmp_path, metrics, {"pretrain": []}, "{}")
  report = (tmp_path / "report.md").read_text()
  assert report.startswith("# moeqjax demo: Switch Transformer (encoder-decoder, summarization")
  assert "| `qat_ternary` | 0.2900 | 0.1450 | 0.2800 | -0.0200 ± 0.0040 | – |" in report
  assert "Greedy summaries of 64 held-out pairs" in report
  metrics["variants"] = {k: {**v, "rouge": {"skipped": "needs rouge-score"}}
                         for k, v in variants.items()}
  write_switch_report(tmp_path, metrics, {"pretrain": []}, "{}")
  assert "Not scored: needs rouge-score" in (tmp_path / "report.md").read_text()
