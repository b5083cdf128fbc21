"""`moeqjax demo`: pretrain (cached) or import a HF checkpoint, RTN baselines, QAT variants, evaluation and report."""

from __future__ import annotations

import json
import pathlib
import time

import ml_collections
import numpy as np

from moeqjax import alloc
from moeqjax.alloc import gguf_target
from moeqjax.alloc.allocation import AllocationError, allocate, write_allocation
from moeqjax.data import eval_windows, make_tokenizer, unigram_bits_per_token
from moeqjax.eval import REFERENCE, evaluate_variants
from moeqjax.eval.report import CONTROL, write_report
from moeqjax.model import default_quant, init_ratios, set_expert_codes
from moeqjax.model.projection_codes import PROJECTIONS
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline import runs
from moeqjax.pipeline.deploy import DEPLOY_VARIANTS, deploy_packed
from moeqjax.pipeline.mesh import eval_mesh
from moeqjax.pipeline.pretrain import pretrain
from moeqjax.pipeline.qat import qat
from moeqjax.pipeline.serve import end_of_text_id
from moeqjax.pipeline.workdirs import load_data
from moeqjax.serve import SamplingConfig, generate, load_packed, pack
from moeqjax.train.metrics_log import read_metrics

# The mixed-precision variant: per-expert codes allocated from the router statistics that the
# `fp_continued` run (a full-precision fine-tune, as in the study's protocol) collected in its train
# step, by the method that won the allocation study (docs/results/study.md: MC-MoE style), within
# MIXED_BUDGET expert code bits per weight; then QAT with the same recipe as the uniform variants.
MIXED = "qat_mixed"
MIXED_METHOD = "mc_moe"
MIXED_BUDGET = 2.5  # code bits per expert weight (scales excluded)
MIXED_STATS_FROM = CONTROL

# The runtime-aware variant: one exact ggml type per (layer, projection) tensor (`allocate --target
# gguf`, moeqjax.alloc.gguf_target), since llama.cpp stores a layer's experts as three tensors of
# one type each and widens qat_mixed's per-expert mix at export. Its budget is the GGUF expert bytes
# that qat_mixed's export actually takes after that widening, not MIXED_BUDGET: on the demo model
# (rows of D=64 / F=128 weights, below TQ's blocks of 256) ternary has no exact ggml type, so the
# cheapest exact allocation is all-Q4_0 (4.5 bits per weight) and 2.5 bits cannot be met. At equal
# llama.cpp file bytes, it compares a student trained for what llama.cpp holds with the per-expert
# mix that llama.cpp widens. Choices exclude F16: `pack` refuses full-precision experts.
GGUF_VARIANT = "qat_gguf"
GGUF_METHOD = "exact"
GGUF_CHOICES = (1, 4, 8)  # ternary (TQ2_0/TQ1_0), Q4_0, Q8_0, where exact for the row length
GGUF_DESCRIPTION = (
    f"one exact ggml type per (layer, projection) ({GGUF_METHOD} allocation with --target gguf "
    f"from the router statistics of the {MIXED_STATS_FROM} run), within the GGUF expert bytes of "
    f"{MIXED}'s export after widening, after QAT with the same joint objective")

# Variant name -> (expert code, trained with QAT?, description). Keys are stable: they are the
# keys of metrics.json["variants"] (documented in the README). Code None: allocated (MIXED).
DEMO_VARIANTS = {
    "full_precision": (0, False, "the pretrained model, no quantization (the teacher)"),
    "fp_continued": (0, True, "control: the same QAT recipe and steps with no quantization "
                     "(code 0), so extra training is not mistaken for a quantization gain"),
    "rtn_int4": (4, False, "round-to-nearest int4 experts, per-channel scales (quant.scale_init), "
                 "no training"),
    "rtn_ternary": (1, False, "round-to-nearest ternary experts (BitNet absmean, or MSE-searched "
                    "scales with quant.scale_init='mse'), no training"),
    "qat_ternary": (1, True, "ternary experts after QAT with the joint objective "
                    "(CE + block reconstruction + logits KD + routing value + structure)"),
    "qat_int2": (2, True, "int2 experts after QAT with the same joint objective"),
  MIXED: (None, True, f"per-expert codes ({MIXED_METHOD} allocation at {MIXED_BUDGET} code bits "
          f"from the router statistics of the {MIXED_STATS_FROM} run) after QAT with the same "
          "joint objective"),
    GGUF_VARIANT: (None, True, GGUF_DESCRIPTION),
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
  hf_dir = pathlib.Path(hf_dir).expanduser()
  if not (hf_dir / "config.json").is_file():
    raise config_io.ConfigError(f"--hf-dir {hf_dir} has no config.json; pass a Hugging Face "
                                "checkpoint folder (config.json + *.safetensors)")
  if import_hf.is_imported(out):
    record = json.loads((out / import_hf.IMPORT_MARKER).read_text())
    if record["hf_dir"] != str(hf_dir.absolute()):
      raise config_io.ConfigError(
          f"{out} holds an import of {record['hf_dir']}, not {hf_dir.absolute()}; choose another "
          "--workdir or delete this one")
  else:
    dtype = config.model.param_dtype if config.model.param_dtype in ("float32", "bfloat16") else "float32"
    import_hf.import_checkpoint(hf_dir, out, config, "the demo config", dtype)
    record = json.loads((out / import_hf.IMPORT_MARKER).read_text())
  with config.unlocked():
    config.model = ml_collections.ConfigDict(record["model"])
  if not config.data.tokenizer:
    # The checkpoint's own tokenizer (copied on import; an older import points at hf_dir's).
    config.data.tokenizer = runs.run_tokenizer(out) or (
        str(hf_dir.absolute()) if (hf_dir / "tokenizer.json").is_file() else "")
  return import_hf.load_imported_params(out, config_io.model_config(config))


DEMO_PACKED = ("qat_ternary", "qat_int2")  # the demo's students that are packed and served
DEMO_PROMPT_TOKENS = 64
DEMO_NEW_TOKENS = 64


def pack_variant(cfg, workdir: pathlib.Path, name: str, student: dict, tokenizer_name: str) -> dict:
  """Packs one demo student into workdir/packed/<name> (replacing it); returns the manifest."""
  eos_id = end_of_text_id(make_tokenizer(tokenizer_name))
  # bf16 like the model its bytes are compared with (the report's fp_bf16_over_packed); the
  # demo's sample and deploy checks read this packed folder itself, so nothing compares it with
  # the fake-quant student.
  return pack(cfg, student["params"], student["quant"], workdir / "packed" / name,
              fp_dtype="bfloat16", tokenizer=tokenizer_name or None, eos_id=eos_id,
              overwrite=True, source=str((workdir / name).absolute()))


def demo_deploy(cfg, workdir: pathlib.Path, students: dict, prompt_ids, tokenizer_name: str) -> dict:
  """The deploy check (pipeline.deploy) of the demo's students in DEPLOY_VARIANTS, packed first
  where demo_serving did not pack them."""
  folders = {}
  for name in DEPLOY_VARIANTS:
    if name in students:
      if name not in DEMO_PACKED:
        pack_variant(cfg, workdir, name, students[name], tokenizer_name)
      folders[name] = workdir / "packed" / name
  return deploy_packed(workdir, folders, prompt_ids)


def demo_serving(cfg, workdir: pathlib.Path, students: dict, prompt_ids, tokenizer_name: str,
                 fp_model_bytes: int) -> dict:
  """Packs the demo's QAT students, and continues a held-out prompt from the packed ternary one.

  Args:
    cfg: the model config.
    workdir: the demo workdir; packed folders go to workdir/packed/<variant>.
    students: variant name -> {"params", "quant"} for the names in DEMO_PACKED.
    prompt_ids: int token ids [S] of a held-out prompt.
    tokenizer_name: config.data.tokenizer ("" for bytes).
    fp_model_bytes: bytes of the whole full-precision model at bf16, to compare with.

  Returns:
    {"packed": {variant: bytes...}, "sample": {prompt, continuation, speeds}} (JSON-ready).
  """
  tokenizer = make_tokenizer(tokenizer_name)
  eos_id = end_of_text_id(tokenizer)
  packed = {}
  for name in DEMO_PACKED:
    folder = workdir / "packed" / name
    b = pack_variant(cfg, workdir, name, students[name], tokenizer_name)["bytes"]
    packed[name] = {
        "folder": str(folder),
        "tensor_bytes": b["all_tensors"],
        "file_bytes": sum(f.stat().st_size for f in folder.iterdir()),
        "expert_tensor_bytes": b["expert_tensors_on_disk"],
        "expert_bytes_accounted": b["expert_bytes_accounted"],
        "fp_bf16_model_bytes": fp_model_bytes,
        "fp_bf16_over_packed": fp_model_bytes / b["all_tensors"],
    }
  served = load_packed(workdir / "packed" / DEMO_PACKED[0])
  prompt_ids = np.asarray(prompt_ids)[:cfg.max_seq_len // 2]  # room to generate in any context
  gen = generate(served.model, served.variables, np.asarray(prompt_ids)[None], DEMO_NEW_TOKENS,
                 eos_id=eos_id, sampling=SamplingConfig(vocab_limit=tokenizer.vocab_size))
  new = gen.tokens[0, :int(gen.lengths[0])]
  if eos_id is not None and new.size and new[-1] == eos_id:
    new = new[:-1]
  sample = {"variant": DEMO_PACKED[0], "prompt": tokenizer.decode(prompt_ids),
            "continuation": tokenizer.decode(new),
            "prefill_tokens_per_s": gen.prefill_tokens_per_s,
            "decode_tokens_per_s": gen.decode_tokens_per_s}
  return {"packed": packed, "sample": sample}


def mixed_allocation(cfg, teacher_params, stats: dict, path: pathlib.Path):
  """The MIXED variant's allocation from `stats` (written to `path`): MIXED_METHOD at MIXED_BUDGET.

  The quantization errors it weighs are those of the teacher, which QAT starts from.
  """
  result = allocate(MIXED_METHOD, cfg, teacher_params, stats, MIXED_BUDGET, "code_bits")
  write_allocation(path, result)
  return result


def gguf_allocation(cfg, teacher_params, stats: dict, mixed_codes, path: pathlib.Path):
  """The GGUF_VARIANT's allocation (written to `path`), or why the variant is not run.

  GGUF_METHOD over GGUF_CHOICES with target "gguf", from `stats`, within the GGUF expert bytes of
  `mixed_codes` (MIXED's codes [L, E]) as the export stores them (gguf_target.gguf_expert_bytes:
  each tensor widened to its widest code's container). The allocation records that budget as
  `budget_from`.

  Returns:
    (Allocation, None), or (None, one line saying why the variant is skipped): a projection no
    choice holds exactly (rows too short for every ggml block), MIXED's codes with no GGUF export,
    or an infeasible budget.
  """
  ok, why = gguf_target.availability(cfg, GGUF_CHOICES)
  for p, name in enumerate(PROJECTIONS):
    if not ok[p].any():
      reasons = "; ".join(f"{qtype}: {reason}" for qtype, reason in why[name].items())
      return None, (f"`{GGUF_VARIANT}` not run: no ggml block type holds {name} of this model "
                    f"exactly ({reasons}), and `pack` refuses F16 experts")
  try:
    mixed = gguf_target.gguf_expert_bytes(cfg, mixed_codes)
  except ValueError as e:
    return None, f"`{GGUF_VARIANT}` not run: {MIXED}'s codes have no GGUF export here ({e})"
  try:
    result = allocate(GGUF_METHOD, cfg, teacher_params, stats, mixed["bytes"], "bytes",
                      choices=GGUF_CHOICES, target="gguf")
  except AllocationError as e:
    return None, f"`{GGUF_VARIANT}` not run: {e}"
  cheapest = gguf_target.cheapest_bytes(gguf_target.bytes_table(cfg, GGUF_CHOICES), ok)
  result.extra["budget_from"] = {
      "variant": MIXED, "gguf_bytes": mixed["bytes"],
      "gguf_bits_per_weight": mixed["bits_per_weight"], "gguf_types": mixed["types"],
      "cheapest_bits_per_weight": 8.0 * float(cheapest) / alloc.num_expert_weights(
          gguf_target.projection_shapes(cfg), cfg.num_layers, cfg.num_experts)}
  write_allocation(path, result)
  return result, None


def gguf_note(allocation) -> str:
  """The report's line on the GGUF_VARIANT's budget, its types and the types left out."""
  src, got = allocation.extra["budget_from"], allocation.achieved
  cheapest = src["cheapest_bits_per_weight"]
  types = sorted({t for row in allocation.extra["gguf_types"].values() for t in row.values()})
  line = (f"`{GGUF_VARIANT}`'s budget is the {src['gguf_bytes']:,} GGUF expert bytes of "
          f"`{MIXED}`'s export after widening ({src['gguf_bits_per_weight']:.3f} bits per expert "
          "weight), so both are compared at equal llama.cpp file bytes; the cheapest exact ggml "
          f"types of this model take {cheapest:.3f} bits per weight")
  if cheapest > MIXED_BUDGET:
    line += f", above {MIXED}'s {MIXED_BUDGET} code bits, so that budget cannot be met in GGUF"
  line += (f". It takes {got['bytes']:,} bytes ({got['bits_per_weight']:.3f} bits per weight, "
           f"block scales included) in {', '.join(types)}")
  left = {}  # (type, reason) -> projections
  for name, per in allocation.extra["gguf_left_out"].items():
    for qtype, reason in per.items():
      left.setdefault((qtype, reason), []).append(name)
  if left:
    line += "; left out as not exact here: " + "; ".join(
        f"{qtype} for {', '.join(names)} ({reason})" for (qtype, reason), names in left.items())
  return line + "."


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
  corpus = load_data(config)
  timings["data"] = time.perf_counter() - t

  curves = {}
  if hf_dir is None:
    t = time.perf_counter()
    teacher = pretrain(config, workdir / "pretrain", corpus, resume=True)
    timings["pretrain"] = time.perf_counter() - t
    params = teacher.params
    curves["pretrain"] = read_metrics(workdir / "pretrain" / "metrics.jsonl")
  qat_offset = 0 if hf_dir is not None else config.pretrain.steps

  quant = default_quant(cfg)
  shape = (cfg.num_layers, cfg.num_experts)
  variants, descriptions, states, allocations, skipped = {}, {}, {}, {}, {}
  for name, (code, trained, text) in DEMO_VARIANTS.items():
    if name == GGUF_VARIANT:
      found, reason = gguf_allocation(cfg, params, states[MIXED_STATS_FROM].stats,
                                      allocations[MIXED].codes_LxE,
                                      workdir / f"{name}_allocation.json")
      if found is None:
        skipped[name] = reason
        continue
      allocations[name] = found
    descriptions[name] = text
    if not trained and code == 0:
      variants[name] = {"params": params}
    elif not trained:
      rtn_quant = set_expert_codes(quant, np.full(shape, code))
      # Rules that learn ratios need them: RTN uses their initial value (1, or the MSE search).
      variants[name] = {"params": init_ratios(cfg, params, rtn_quant), "quant": rtn_quant}
    else:
      t = time.perf_counter()
      if name == MIXED:
        allocations[name] = mixed_allocation(cfg, params, states[MIXED_STATS_FROM].stats,
                                             workdir / f"{name}_allocation.json")
      if code is None:
        codes = np.asarray(allocations[name].codes_LxE)
      else:
        codes = np.full(shape, code)
      # The teacher is recorded, so that `moeqjax eval --workdir DEMO/<variant>` finds it.
      teacher_dir = workdir / (HF_IMPORT_DIR if hf_dir is not None else "pretrain")
      state = qat(config, workdir / name, corpus, params, expert_codes_LxE=codes, resume=True,
                  provenance={"teacher": str(teacher_dir.absolute())})
      timings[name] = time.perf_counter() - t
      states[name] = state
      variants[name] = {"params": state.params, "quant": state.quant}
      # QAT continues from the end of pretraining: plot it there.
      curves[name] = [dict(r, step=r["step"] + qat_offset)
                      for r in read_metrics(workdir / name / "metrics.jsonl")]

  t = time.perf_counter()
  windows = eval_windows(corpus.valid, config.eval.seq_len, config.eval.num_windows)
  results = evaluate_variants(cfg, variants, windows, config.eval.batch_size, control=CONTROL,
                              placement=eval_mesh(config))
  baseline = unigram_bits_per_token(corpus.train, corpus.valid, cfg.vocab_size)
  timings["eval"] = time.perf_counter() - t
  t = time.perf_counter()
  serving = demo_serving(cfg, workdir, variants, np.asarray(corpus.valid[:DEMO_PROMPT_TOKENS]),
                         config.data.tokenizer, results[REFERENCE]["model_bytes"])
  timings["serve"] = time.perf_counter() - t
  t = time.perf_counter()
  deploy = demo_deploy(cfg, workdir, variants, np.asarray(corpus.valid[:DEMO_PROMPT_TOKENS]),
                       config.data.tokenizer)
  timings["deploy"] = time.perf_counter() - t
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
      *([gguf_note(allocations[GGUF_VARIANT])] if GGUF_VARIANT in allocations else []),
      *skipped.values(),
  ]
  return write_report(workdir, results, descriptions=descriptions, baseline=baseline,
                      fingerprint=corpus.fingerprint, unit=corpus.unit, curves=curves,
                      timings=timings, notes=notes, config_text=config_io.config_json(config),
                      serving=serving, deploy=deploy,
                      allocations={k: a.to_json() for k, a in allocations.items()} or None,
                      skipped=skipped or None)
