"""`moeqjax demo`: pretrain (cached) or import a HF checkpoint, RTN baselines, QAT variants, evaluation and report."""

from __future__ import annotations

import json
import pathlib
import time

import ml_collections
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


HF_IMPORT_DIR = "hf_import"  # the demo workdir's subfolder holding an imported checkpoint


def import_teacher(config, hf_dir: str | pathlib.Path, out: pathlib.Path):
  """Imports `hf_dir` into `out` once (reused after) and points `config` at the checkpoint.

  Sets config.model to the checkpoint's model section (user model overrides do not apply) and,
  when config.data.tokenizer is "" and hf_dir holds a tokenizer.json, config.data.tokenizer to
  hf_dir, since the checkpoint's embeddings only make sense with its own tokenizer.

  Returns:
    The imported params.
  """
  from moeqjax.convert import workdir as convert_workdir  # pylint: disable=import-outside-toplevel
  hf_dir = pathlib.Path(hf_dir).expanduser()
  if not (hf_dir / "config.json").is_file():
    raise config_io.ConfigError(f"--hf-dir {hf_dir} has no config.json; pass a Hugging Face "
                                "checkpoint folder (config.json + *.safetensors)")
  if convert_workdir.is_imported(out):
    record = json.loads((out / convert_workdir.IMPORT_MARKER).read_text())
    if record["hf_dir"] != str(hf_dir.absolute()):
      raise config_io.ConfigError(
          f"{out} holds an import of {record['hf_dir']}, not {hf_dir.absolute()}; choose another "
          "--workdir or delete this one")
  else:
    dtype = config.model.param_dtype if config.model.param_dtype in ("float32", "bfloat16") else "float32"
    convert_workdir.import_checkpoint(hf_dir, out, config, "the demo config", dtype)
    record = json.loads((out / convert_workdir.IMPORT_MARKER).read_text())
  with config.unlocked():
    config.model = ml_collections.ConfigDict(record["model"])
  if not config.data.tokenizer and (hf_dir / "tokenizer.json").is_file():
    config.data.tokenizer = str(hf_dir.absolute())
  return convert_workdir.load_imported_params(out, config_io.model_config(config))


def run_demo(config, workdir: str | pathlib.Path, hf_dir: str | pathlib.Path | None = None) -> dict:
  """Runs the whole pipeline into `workdir`; finished phases are reused, killed ones resumed.

  Args:
    config: the experiment config (changed in place when hf_dir is given: see import_teacher).
    workdir: output folder.
    hf_dir: a local HF MoE checkpoint folder to start from instead of pretraining; its
      tokenizer.json is used when config.data.tokenizer is "".

  Returns:
    The metrics dict also written to workdir/metrics.json.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  timings = {}
  start = time.perf_counter()
  if hf_dir is not None:
    params = import_teacher(config, hf_dir, workdir / HF_IMPORT_DIR)
    timings["import"] = time.perf_counter() - start
  cfg = config_io.model_config(config)
  t = time.perf_counter()
  corpus = runs.load_data(config)
  timings["data"] = time.perf_counter() - t

  curves = {}
  if hf_dir is None:
    t = time.perf_counter()
    teacher = runs.pretrain(config, workdir / "pretrain", corpus, resume=True)
    timings["pretrain"] = time.perf_counter() - t
    params = teacher.params
    curves["pretrain"] = read_metrics(workdir / "pretrain" / "metrics.jsonl")
  qat_offset = 0 if hf_dir is not None else config.pretrain.steps

  quant = runs.default_quant(cfg)
  shape = (cfg.num_layers, cfg.num_experts)
  variants, descriptions = {}, {}
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
      curves[name] = [dict(r, step=r["step"] + qat_offset)
                      for r in read_metrics(workdir / name / "metrics.jsonl")]

  t = time.perf_counter()
  windows = eval_windows(corpus.valid, config.eval.seq_len, config.eval.num_windows)
  results = evaluate_variants(cfg, variants, windows, config.eval.batch_size)
  baseline = unigram_bits_per_token(corpus.train, corpus.valid, cfg.vocab_size)
  timings["eval"] = time.perf_counter() - t
  t = time.perf_counter()
  from moeqjax.serve_run import DEMO_PROMPT_TOKENS, demo_serving  # pylint: disable=import-outside-toplevel
  serving = demo_serving(cfg, workdir, variants, np.asarray(corpus.valid[:DEMO_PROMPT_TOKENS]),
                         config.data.tokenizer, results[REFERENCE]["model_bytes"])
  timings["serve"] = time.perf_counter() - t
  timings["total"] = time.perf_counter() - start
  if hf_dir is None:
    teacher_note = (f"Pretraining: {config.pretrain.steps} steps of {config.pretrain.batch_size}x"
                    f"{config.pretrain.seq_len} tokens; QAT: {config.qat.steps} steps of "
                    f"{config.qat.batch_size}x{config.qat.seq_len} on the same training split.")
  else:
    teacher_note = (f"Teacher: the Hugging Face checkpoint {pathlib.Path(hf_dir).absolute()} "
                    f"(imported into {HF_IMPORT_DIR}/, no pretraining); QAT: {config.qat.steps} "
                    f"steps of {config.qat.batch_size}x{config.qat.seq_len} on the training split.")
  notes = [
      f"Evaluation: {results[REFERENCE]['eval_tokens']:,} held-out {corpus.unit}s in "
      f"{windows.shape[0]} windows of {windows.shape[1] - 1}.",
      f"Tokenizer: {corpus.fingerprint['tokenizer']} (vocab {corpus.vocab_size}); metrics are "
      f"per {corpus.unit}.",
      teacher_note,
      "QAT continues training on the pretraining data, so compare QAT rows with "
      "`fp_continued` (same steps, no quantization) to read the cost of quantization alone; "
      "`full_precision` is the teacher the RTN rows start from.",
      "Reused phases (already finished in this workdir) count ~0 s of wall time.",
  ]
  return write_report(workdir, results, descriptions=descriptions, baseline=baseline,
                      fingerprint=corpus.fingerprint, unit=corpus.unit, curves=curves,
                      timings=timings, notes=notes, config_text=config_io.config_json(config),
                      serving=serving)
