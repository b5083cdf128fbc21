"""`moeqjax demo`: pretrain (cached), round-to-nearest baselines, QAT variants, evaluation and report."""

from __future__ import annotations

import pathlib
import time

import numpy as np

from moeqjax import config_io, runs
from moeqjax.data import eval_windows, unigram_bits_per_token
from moeqjax.eval import REFERENCE, evaluate_variants
from moeqjax.eval.report import write_report
from moeqjax.train.metrics_log import read_metrics

# Variant name -> (expert code, trained with QAT?, description). Keys are stable: they are the
# keys of metrics.json["variants"] (documented in the README).
DEMO_VARIANTS = {
    "full_precision": (0, False, "the pretrained model, no quantization (the teacher)"),
    "fp_continued": (0, True, "control: the same QAT recipe and steps with no quantization "
                     "(code 0), so extra training is not mistaken for a quantization gain"),
    "rtn_int4": (4, False, "round-to-nearest int4 experts, per-channel scales, no training"),
    "rtn_ternary": (1, False, "round-to-nearest ternary experts (BitNet absmean), no training"),
    "qat_ternary": (1, True, "ternary experts after QAT with the joint objective "
                    "(CE + block reconstruction + logits KD + routing value + structure)"),
    "qat_int2": (2, True, "int2 experts after QAT with the same joint objective"),
}


def run_demo(config, workdir: str | pathlib.Path) -> dict:
  """Runs the whole pipeline into `workdir`; finished phases are reused, killed ones resumed.

  Returns:
    The metrics dict also written to workdir/metrics.json.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  cfg = config_io.model_config(config)
  timings = {}
  start = time.perf_counter()
  corpus = runs.load_data(config)
  timings["data"] = time.perf_counter() - start

  t = time.perf_counter()
  teacher = runs.pretrain(config, workdir / "pretrain", corpus, resume=True)
  timings["pretrain"] = time.perf_counter() - t
  params = teacher.params

  quant = runs.default_quant(cfg)
  shape = (cfg.num_layers, cfg.num_experts)
  variants, descriptions, curves = {}, {}, {"pretrain": read_metrics(
      workdir / "pretrain" / "metrics.jsonl")}
  for name, (code, trained, text) in DEMO_VARIANTS.items():
    descriptions[name] = text
    if not trained and code == 0:
      variants[name] = {"params": params}
    elif not trained:
      variants[name] = {"params": params,
                        "quant": runs.set_expert_codes(quant, np.full(shape, code))}
    else:
      t = time.perf_counter()
      state = runs.qat(config, workdir / name, corpus, params,
                       expert_codes_LxE=np.full(shape, code), resume=True)
      timings[name] = time.perf_counter() - t
      variants[name] = {"params": state.params, "quant": state.quant}
      # QAT continues from the end of pretraining: plot it there.
      curves[name] = [dict(r, step=r["step"] + config.pretrain.steps)
                      for r in read_metrics(workdir / name / "metrics.jsonl")]

  t = time.perf_counter()
  windows = eval_windows(corpus.valid, config.eval.seq_len, config.eval.num_windows)
  results = evaluate_variants(cfg, variants, windows, config.eval.batch_size)
  baseline = unigram_bits_per_token(corpus.train, corpus.valid, cfg.vocab_size)
  timings["eval"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start
  notes = [
      f"Evaluation: {results[REFERENCE]['eval_tokens']:,} held-out tokens in "
      f"{windows.shape[0]} windows of {windows.shape[1] - 1}.",
      f"Pretraining: {config.pretrain.steps} steps of {config.pretrain.batch_size}x"
      f"{config.pretrain.seq_len} tokens; QAT: {config.qat.steps} steps of "
      f"{config.qat.batch_size}x{config.qat.seq_len} on the same training split.",
      "QAT continues training on the pretraining data, so compare QAT rows with "
      "`fp_continued` (same steps, no quantization) to read the cost of quantization alone; "
      "`full_precision` is the teacher the RTN rows start from.",
      "Reused phases (already finished in this workdir) count ~0 s of wall time.",
  ]
  return write_report(workdir, results, descriptions=descriptions, baseline=baseline,
                      fingerprint=corpus.fingerprint, unit="byte", curves=curves,
                      timings=timings, notes=notes, config_text=config_io.config_json(config))
