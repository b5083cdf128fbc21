"""The `moeqjax` command line: thin subcommands over the pipeline (moeqjax.pipeline)."""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import sys

# Help text only: `moeqjax allocate --help` says how rule-based methods become bytes.
from moeqjax.alloc.rules import rule_bytes_text

DEFAULT_WORKDIRS = {"demo": "./moeqjax_runs/demo", "pretrain": "./moeqjax_runs/pretrain",
                    "qat": "./moeqjax_runs/qat", "ptq": "./moeqjax_runs/ptq", "eval": None}
_STUDY_COMMANDS = ("stats", "allocate", "study")
METHOD_NAMES = ("paper_combined", "paper_router", "paper_router_reversed", "router_norm", "exact",
                "frequency", "gate_weight", "mc_moe", "uniform", "random")


class UserError(Exception):
  """Bad input from the user: printed as one line, no traceback."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="moeqjax",
      description="Quantization-aware fine-tuning of MoE language models (ternary / low-bit).",
      epilog="Any config field can be overridden with --config.<section>.<key>=<value>.")
  sub = parser.add_subparsers(dest="command", required=True)

  def common(p, workdir_help):
    p.add_argument("--config", default=None, help="configs/<name>.py (default: configs/tiny.py)")
    p.add_argument("--workdir", default=None, help=workdir_help)
    p.add_argument("--data", default=None,
                   help="text file, folder of text files, .jsonl with a 'text' field, or "
                        ".parquet/.arrow/.feather with a 'text' column (data.text_field; needs "
                        "the `data` extra) (default: the embedded Python-stdlib corpus)")
    p.add_argument("--tokenizer", default=None,
                   help="folder with a Hugging Face tokenizer.json (or the file) to tokenize "
                        "--data with; sets data.tokenizer (default: UTF-8 bytes; needs the "
                        "`data` extra)")

  p = sub.add_parser("demo", help="pretrain, quantize (RTN and QAT), evaluate, write a report")
  common(p, f"output folder (default {DEFAULT_WORKDIRS['demo']})")
  p.add_argument("--hf-dir", default=None,
                 help="start from this local HF MoE checkpoint (Mixtral, Qwen2/3-MoE, OLMoE) "
                      "instead of pretraining; its model config is used, and its tokenizer.json "
                      "unless --tokenizer is given")

  def distributed(p):
    g = p.add_argument_group("multi-process (jax.distributed; all processes share --workdir)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address, the same on every process; 'auto' lets JAX detect "
                        "a Cloud TPU / SLURM / Open MPI cluster (default: $JAX_COORDINATOR_ADDRESS, "
                        "else a single process)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="processes in the run (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process, 0 .. N-1 (default: $JAX_PROCESS_ID)")
    g.add_argument("--distributed-timeout", type=int, default=300, metavar="SECONDS",
                   help="how long to wait for the coordinator and the other processes (300)")

  p = sub.add_parser("pretrain", help="train the full-precision model (the teacher)")
  common(p, f"output folder (default {DEFAULT_WORKDIRS['pretrain']})")
  distributed(p)
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")

  p = sub.add_parser("qat", help="quantization-aware fine-tuning from a pretrained teacher")
  common(p, f"output folder (default {DEFAULT_WORKDIRS['qat']})")
  p.add_argument("--teacher", required=True, help="workdir of a finished `moeqjax pretrain`")
  p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
  distributed(p)
  p.add_argument("--allocation", default=None,
                 help="allocation.json from `moeqjax allocate` (default: quant.expert_code everywhere)")
  p.add_argument("--init-from", default=None,
                 help="a `moeqjax ptq` workdir (e.g. --method gptq): the student starts from its "
                      "quantized student, at its codes unless --allocation is given")

  p = sub.add_parser("ptq", help="post-training quantization of a teacher (round-to-nearest or "
                     "per-expert GPTQ) into a workdir that eval, pack, export and generate read")
  common(p, "output folder (read like a finished `moeqjax qat` workdir)")
  p.add_argument("--teacher", required=True, help="workdir of a finished `moeqjax pretrain`")
  p.add_argument("--method", required=True, choices=("rtn", "gptq"),
                 help="rtn: the fake quantizer's rounding; gptq: routed experts by GPTQ with "
                      "per-expert Hessians from the tokens routed to them")
  p.add_argument("--allocation", default=None,
                 help="allocation.json from `moeqjax allocate` (default: quant.expert_code everywhere)")
  p.add_argument("--calib-batches", type=int, default=8,
                 help="calibration batches of qat.batch_size x qat.seq_len train tokens (gptq; a "
                      "Switch config: the qat phase's first training batches of seq2seq examples)")

  p = sub.add_parser("eval", help="evaluate a QAT run against its full-precision teacher")
  common(p, "workdir of a finished `moeqjax qat` or `moeqjax ptq`")
  p.add_argument("--teacher", default=None,
                 help="the teacher's `moeqjax pretrain` workdir or `import-hf` folder (default: "
                      "the teacher the student's run recorded)")
  p.add_argument("--control", default=None,
                 help="a finished full-precision `moeqjax qat` run of the same teacher, objective "
                      "and schedule (`--config.quant.expert_code=0`): eval.json adds it and the "
                      "student's Δ and routing drift against it")
  distributed(p)

  p = sub.add_parser("import-hf", help="import a local Hugging Face MoE checkpoint (Mixtral, "
                     "Qwen2-MoE, Qwen3-MoE, OLMoE, Switch Transformers) as a teacher folder for "
                     "`moeqjax qat`")
  p.add_argument("--hf-dir", required=True, help="folder with config.json and *.safetensors")
  p.add_argument("--out", required=True, help="output folder: params, config.py, hf_config.json")
  p.add_argument("--config", default=None,
                 help="config whose non-model sections (quant, qat, ...) the written config.py "
                      "starts from (default: configs/tiny.py; configs/switch_tiny.py for a "
                      "switch_transformers checkpoint)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--allow-unknown-config", action="store_true",
                 help="ignore config.json keys moeqjax does not know (default: error)")

  p = sub.add_parser("export", help="write a QAT student for another runtime: HF layout "
                     "(dequantized), one GGUF file for llama.cpp, or a compressed-tensors folder "
                     "for vLLM (both from the integer codes)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--workdir", default=None,
                   help="a finished `moeqjax qat` workdir (or an `import-hf` folder)")
  src.add_argument("--packed", default=None,
                   help="a `moeqjax pack` folder: its stored codes and scales are exported as "
                        "they are")
  p.add_argument("--format", default="hf", choices=("hf", "gguf", "compressed-tensors"))
  p.add_argument("--out", required=True,
                 help="hf, compressed-tensors: output folder; gguf: the .gguf file (its report "
                      "FILE.export_report.json is written beside it)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out that moeqjax wrote as this format (anything "
                      "else is refused and left as it is)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="hf, compressed-tensors: dtype of the unquantized (hf: all) weights; "
                      "float32 (default) is exact, bfloat16 half the bytes")
  p.add_argument("--fp-dtype", default="f32", choices=("f32", "f16", "bf16"),
                 help="gguf: dtype of unquantized matrices (norms and router stay f32)")
  p.add_argument("--all-f32", action="store_true",
                 help="gguf: write every tensor, quantized ones dequantized, as f32 (a control)")
  p.add_argument("--requantize-mixed", default=None, choices=("TQ2_0", "TQ1_0", "Q4_0"),
                 help="gguf: store expert tensors whose experts mix codes at this narrower type, "
                      "re-quantizing the experts it cannot hold exactly (off by default; "
                      "the report gives the relative error)")
  p.add_argument("--tokenizer", default=None,
                 help="gguf: a HF tokenizer.json (or its folder) for the vocabulary; default: "
                      "the run's recorded tokenizer, else the byte vocabulary")
  p.add_argument("--hf-config", default=None,
                 help="hf: the original config.json (or its folder); default: the workdir's "
                      "hf_config.json, else one built from the model config")
  p.add_argument("--model-type", default=None,
                 help="hf: family to write (mixtral, qwen2_moe, qwen3_moe, olmoe); default: "
                      "from --hf-config, else inferred")

  p = sub.add_parser("pack", help="write a finished QAT student as a packed low-bit checkpoint "
                     "(per-expert codes kept) for `moeqjax generate --packed`")
  p.add_argument("--workdir", required=True, help="a finished `moeqjax qat` workdir")
  p.add_argument("--out", required=True, help="output folder (model.safetensors, manifest.json)")
  p.add_argument("--fp-dtype", default="float32", choices=("float32", "bfloat16"),
                 help="dtype of the weights that stay unquantized (norms, embeddings, ...); "
                      "float32 (default) generates as the QAT workdir does, bfloat16 halves "
                      "their bytes")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out that `moeqjax pack` wrote (anything else is "
                      "refused and left as it is)")

  p = sub.add_parser("generate", help="generate text from a packed checkpoint, a QAT student "
                     "(fake quant) or a full-precision run, with a KV cache (a Switch "
                     "Transformer: the prompt is its encoder input, <extra_id_N> its "
                     "sentinels)")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--packed", default=None, help="a folder written by `moeqjax pack`")
  src.add_argument("--workdir", default=None,
                   help="a finished `moeqjax qat` (fake quant) or `moeqjax pretrain` workdir, or "
                        "an `import-hf` folder")
  text = p.add_mutually_exclusive_group(required=True)
  text.add_argument("--prompt", default=None, help="the prompt text")
  text.add_argument("--prompt-file", default=None, help="a UTF-8 file holding the prompt")
  p.add_argument("--max-new-tokens", type=int, default=128)
  p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
  p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tokenizer", default=None,
                 help="the model's tokenizer.json (or its folder), for a run whose recorded "
                      "tokenizer has moved; it must be the one the model was made with "
                      "(default: the run's or packed folder's own)")

  p = sub.add_parser("plan", help="parameter counts, weight bytes and QAT memory, no allocation")
  p.add_argument("--config", default=None, help="configs/<name>.py (default: configs/tiny.py)")
  p.add_argument("--devices", type=int, default=None,
                 help="device count that resolves a -1 mesh axis (default: the product of the "
                 "other mesh sizes); per-device bytes are computed from shard shapes, no devices")
  p.add_argument("--device-memory-gib", type=float, default=None,
                 help="memory per device: say whether the plan fits and which mesh axis to grow")

  p = sub.add_parser("stats", help="router statistics of a pretrain/QAT workdir: table + "
                     "router_stats.json")
  p.add_argument("--workdir", required=True, help="a `moeqjax pretrain` or `moeqjax qat` workdir")
  p.add_argument("--config", default=None,
                 help="config for sections the workdir does not record (default: configs/tiny.py)")

  p = sub.add_parser(
      "allocate", help="per-expert bit allocation from a workdir's router statistics, within a "
      "budget; writes allocation.json",
      description="Per-expert bit allocation within a byte budget (scales and zero points "
      "counted as the memory report counts them). " + rule_bytes_text(
          "--levels BH,BL (METHODS.md's bh > bl) or else the two --choices whose bytes bracket "
          "B") + " The exact solver and mc_moe "
      "solve a multiple-choice knapsack over --choices that never exceeds the budget; uniform is "
      "the largest single code within it. --target gguf allocates one llama.cpp type per (layer, "
      "projection) tensor instead (ffn_gate/up/down_exps hold one ggml type each): TQ2_0 (TQ1_0 "
      "with quant.ternary_packing=base3), Q4_0, Q8_0 or F16, only where the type holds our grid "
      "exactly (rows a multiple of its block, groups unions of blocks, fp16 scales), in GGUF bytes "
      "with block scales, by --method exact or mc_moe; a type that is not exact for a projection "
      "is left out and the allocation says why.")
  p.add_argument("--workdir", required=True, help="a `moeqjax pretrain` or `moeqjax qat` workdir "
                 "(ideally a fine-tuning run: Lambda is the router norm change over it)")
  p.add_argument("--config", default=None,
                 help="config for sections the workdir does not record (default: configs/tiny.py)")
  p.add_argument("--method", required=True, choices=METHOD_NAMES)
  p.add_argument("--budget", required=True, type=float,
                 help="average bits per expert weight (see --budget-unit), or bytes")
  p.add_argument("--budget-unit", default="bits", choices=("bits", "code_bits", "bytes"),
                 help="bits: scales and zero points included (default); code_bits: scales and "
                      "zero points excluded (the overhead of an intN expert is added, so B code "
                      "bits hold uniform intB); bytes: total expert weight bytes")
  p.add_argument("--choices", default=None,
                 help="candidate codes, comma-separated (1 = ternary, 2/3/4/8 = intN; default "
                      "1,2,3,4,8; with --target gguf 1 = TQ2_0/TQ1_0, 4 = Q4_0, 8 = Q8_0, 0 = F16, "
                      "default 1,4,8,0)")
  p.add_argument("--target", default="experts", choices=("experts", "gguf"),
                 help="experts: a code per expert (default); gguf: a ggml type per (layer, "
                      "projection) that llama.cpp holds exactly, budget in GGUF bytes (--budget-unit "
                      "bits or bytes); `moeqjax qat --allocation` trains exactly that")
  p.add_argument("--levels", default=None, metavar="BH,BL",
                 help="the paper's two levels for the rule-based methods, high then low, e.g. 3,1 "
                      "(default: the two --choices whose bytes bracket the budget)")
  p.add_argument("--seed", type=int, default=0, help="seed of --method random")
  p.add_argument("--out", default=None, help="output file (default: WORKDIR/allocation.json)")

  p = sub.add_parser("study", help="allocation method x objective grid at equal expert bytes; "
                     "writes study.md, study.json and PNG plots")
  p.add_argument("--config", default="configs/study_tiny.py", help="study config")
  p.add_argument("--workdir", default="./moeqjax_runs/study",
                 help="output folder (cached pretrain, fine-tune and finished cells)")
  p.add_argument("--quick", action="store_true", help="the small grid (about 5 minutes)")

  return parser


_NO_CONFIG_COMMANDS = ("import-hf", "export", "plan")
_SERVE_COMMANDS = ("pack", "generate")


def run_serve(args) -> int:
  """pack / generate: thin wrappers over moeqjax.pipeline.serve."""
  from moeqjax.pipeline import serve
  if args.command == "pack":
    manifest = serve.pack_workdir(args.workdir, args.out, fp_dtype=args.fp_dtype,
                                      overwrite=args.overwrite)
    b = manifest["bytes"]
    print(f"packed {args.workdir} into {args.out}: expert tensors {b['expert_tensors_on_disk']:,} "
          f"bytes on disk (memory accounting: {b['expert_bytes_accounted']:,}; "
          f"{b['expert_bits_per_weight']:.3f} bits/weight with scales, {b['expert_code_bits']:.2f} "
          f"code bits), all tensors {b['all_tensors']:,} bytes ({manifest['fp_dtype']} for the "
          f"unquantized ones, {manifest['scale_dtype']} scales)")
    return 0
  if args.prompt_file is not None:
    try:
      prompt = pathlib.Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f"cannot read --prompt-file {args.prompt_file}: {e}") from None
  else:
    prompt = args.prompt
    try:
      prompt.encode("utf-8")
    except UnicodeEncodeError:
      raise UserError("--prompt holds bytes that are not UTF-8 text; pass UTF-8 text, or put the "
                      "prompt in a UTF-8 file and pass --prompt-file") from None
  sampling = serve.sampling_from_flags(args.temperature, args.top_k, args.top_p)
  if args.max_new_tokens < 1:
    raise UserError(f"--max-new-tokens {args.max_new_tokens} must be at least 1")
  model, variables, tokenizer, eos_id, label = serve.model_for_generation(
      args.packed, args.workdir, tokenizer=args.tokenizer)
  if serve.is_switch_model(model):  # encoder-decoder: the prompt is the encoder input
    out = serve.switch_generate_text(model, variables, tokenizer, eos_id, prompt,
                                     args.max_new_tokens, sampling, seed=args.seed)
    how = "greedy" if sampling.temperature == 0 else f"sampled, seed {args.seed}"
    print(f"[{label}, Switch {how}] {len(out.tokens)} tokens from {out.encoder_tokens} encoder "
          f"tokens in {out.seconds:.1f} s (compile included)", file=sys.stderr)
    return 0
  gen = serve.generate_text(model, variables, tokenizer, eos_id, prompt, args.max_new_tokens,
                               sampling, args.seed)
  note = " (stopped at the model's context)" if gen.clamped_to_context else ""
  print(f"[{label}] {int(gen.lengths[0])} tokens{note}; prefill {gen.prefill_tokens_per_s:,.0f} "
        f"tok/s, decode {gen.decode_tokens_per_s:,.1f} tok/s (compile {gen.compile_s:.1f} s)",
        file=sys.stderr)
  return 0


def run_study_command(args, overrides: dict[str, str]) -> int:
  """stats / allocate / study: thin wrappers over the pipeline's stats, allocate and study."""
  from moeqjax.pipeline import config as config_io
  from moeqjax.pipeline import runs
  workdir = pathlib.Path(args.workdir)
  # A Switch run's recorded config is the default (configs/tiny.py for any other run).
  config = runs.starting_config(args.command, args.config, workdir=workdir)
  config_io.apply_overrides(config, overrides)
  if args.command in ("stats", "allocate"):
    # The run's recorded sections are the truth; an override that contradicts them is an error.
    runs.check_family(config, workdir, "--workdir")
    runs.inherit(config, overrides, workdir, "--workdir", runs.RECORDED_SECTIONS,
                 config_given=args.config is not None)
  if args.command == "stats":
    from moeqjax.pipeline.stats import format_table, write_stats
    record = write_stats(config, workdir)
    print(format_table(record))
    print(f"\nwritten {workdir / 'router_stats.json'}")
  elif args.command == "allocate":
    from moeqjax.pipeline.allocate import allocate_workdir, parse_codes
    choices = None if args.choices is None else parse_codes(
        args.choices, f"--choices {args.choices!r} must be comma-separated codes, e.g. 1,2,3,4,8")
    levels = None
    if args.levels is not None:
      levels = parse_codes(args.levels, f"--levels {args.levels!r} must be two comma-separated "
                           "codes, high then low, e.g. 3,1")
    result, out = allocate_workdir(config, workdir, args.method, args.budget, args.budget_unit,
                                   choices=choices, levels=levels, seed=args.seed,
                                   out=pathlib.Path(args.out) if args.out else None,
                                   target=args.target)
    a = result.achieved
    where = "GGUF bytes" if result.target == "gguf" else "budget bytes"
    print(f"{args.method}: {a['bytes']} of {result.budget_bytes} {where}, "
          f"{a['bits_per_weight']:.4f} bits per expert weight (scales included), "
          f"{a['code_bits']:.4f} code bits; written {out}")
    if result.target == "gguf":
      for l, row in sorted(result.extra["gguf_types"].items(), key=lambda kv: int(kv[0])):
        print(f"  layer {l}: " + " ".join(f"{name}={t}" for name, t in row.items()))
      for name, why in result.extra["gguf_left_out"].items():
        for qtype, reason in why.items():
          print(f"  {name}: {qtype} left out ({reason})")
    else:
      for l, row in enumerate(result.codes_LxE):
        print(f"  layer {l}: " + " ".join(str(int(c)) for c in row))
  elif args.command == "study":
    if config_io.is_switch(config):  # the paper's protocol on Switch (pipeline.switch_study)
      from moeqjax.pipeline.switch_study import run_switch_study
      run_switch_study(config, workdir, quick=args.quick, config_path=args.config)
    else:
      from moeqjax.pipeline.study import run_study
      run_study(config, workdir, quick=args.quick, config_path=args.config)
  return 0


def run_convert(args, overrides: dict[str, str]) -> int:
  """import-hf / export / plan: thin wrappers over the pipeline's import, export and plan."""
  from moeqjax.pipeline import config as config_io
  if args.command == "import-hf":
    from moeqjax.pipeline import import_hf
    from moeqjax.pipeline.import_hf import import_checkpoint
    # Without --config the base is the checkpoint family's (configs/tiny.py, or switch_tiny.py).
    base_path = args.config or import_hf.default_base(args.hf_dir)
    base = config_io.load_config(base_path)
    config_io.apply_overrides(base, overrides)
    out = import_checkpoint(args.hf_dir, args.out, base, base_path or "configs/tiny.py",
                            args.dtype, args.allow_unknown_config)
    tokenizer = import_hf.imported_tokenizer(out)
    said = (f"its tokenizer in {tokenizer}" if tokenizer else
            f"no tokenizer.json in {args.hf_dir}: later phases read UTF-8 bytes unless given "
            "--tokenizer")
    print(f"imported {args.hf_dir} into {out} ({said})\nnext: moeqjax qat --teacher {out} "
          "--workdir <qat workdir>")
  elif args.command == "export":
    from moeqjax.pipeline.export import export_student
    source = args.workdir or args.packed
    common = dict(workdir=args.workdir, packed=args.packed, fmt=args.format, dtype=args.dtype,
                  hf_config_path=args.hf_config, model_type=args.model_type,
                  overwrite=args.overwrite)
    if args.format == "gguf":
      report = export_student(args.out, **common, fp_dtype=args.fp_dtype, all_f32=args.all_f32,
                              tokenizer=args.tokenizer, requantize_mixed=args.requantize_mixed)
      print(f"exported {source} as GGUF (llama.cpp arch {report['arch']}) to {args.out}: "
            f"{report['file_bytes']} bytes (moeqjax packed: {report['moeqjax_bytes']})")
    elif args.format == "compressed-tensors":
      report = export_student(args.out, **common)
      print(f"exported {source} as compressed-tensors ({report['expert_container']} experts) "
            f"to {args.out}: {report['file_bytes']} bytes (moeqjax packed: "
            f"{report['moeqjax_bytes']})")
    else:
      out = export_student(args.out, **common)
      print(f"exported {source} as {args.dtype} Hugging Face weights to {out}")
      return 0
    for note in report["notes"]:
      print(f"  note: {note}")
  elif args.command == "plan":
    from moeqjax.pipeline.plan import plan_text
    config = config_io.load_config(args.config)
    config_io.apply_overrides(config, overrides)
    if config_io.is_switch(config):
      raise UserError("`moeqjax plan` covers decoder-only configs; a Switch config runs on one "
                      "device (no mesh plan yet)")
    if args.devices is not None and args.devices < 1:
      raise UserError(f"--devices {args.devices} must be >= 1")
    if args.device_memory_gib is not None and args.device_memory_gib <= 0:
      raise UserError(f"--device-memory-gib {args.device_memory_gib} must be > 0")
    print(plan_text(config, args.devices, args.device_memory_gib))
  return 0


def _split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  rest, overrides = [], {}
  it = iter(argv)
  for arg in it:
    if arg.startswith("--config."):
      key, eq, value = arg[len("--config."):].partition("=")
      if not eq:
        value = next(it, None)
        if value is None:
          raise UserError(f"{arg} needs a value: --config.{key}=<value>")
      overrides[key] = value
    else:
      rest.append(arg)
  return rest, overrides


def _writable_workdir(path: str) -> pathlib.Path:
  workdir = pathlib.Path(path)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir {workdir}: {e.strerror}; choose a writable folder")
  if not os.access(workdir, os.W_OK):
    raise UserError(f"--workdir {workdir} is not writable; choose a writable folder")
  return workdir


# Arguments that name files or folders, which moeqjax reads and writes with the local file system.
_PATH_ARGS = ("workdir", "teacher", "data", "out", "packed", "init_from", "hf_dir", "allocation",
              "config", "tokenizer", "prompt_file", "hf_config", "control")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _local_paths(args):
  """A URL (gs://, s3://, ...) is not a local path: say so, instead of making a folder "gs:"."""
  for name in _PATH_ARGS:
    value = getattr(args, name, None)
    if isinstance(value, str) and _URL.match(value):
      flag = "--" + name.replace("_", "-")
      raise UserError(f"{flag} {value}: URLs are not supported; mount the bucket (e.g. gcsfuse, "
                      f"or a Filestore/NFS share on every host) and pass {flag} the mounted path")


def _path(value: str | None) -> pathlib.Path | None:
  return None if value is None else pathlib.Path(value)


def run(argv: list[str]) -> int:
  argv, overrides = _split_overrides(argv)
  args = _parser().parse_args(argv)
  _local_paths(args)
  if args.command in _NO_CONFIG_COMMANDS:
    return run_convert(args, overrides)
  if args.command in _SERVE_COMMANDS:
    if overrides:
      raise UserError(f"`moeqjax {args.command}` takes its config from the run it reads; drop "
                      f"{', '.join('--config.' + k for k in overrides)}")
    return run_serve(args)
  if args.command in _STUDY_COMMANDS:
    return run_study_command(args, overrides)
  # Heavy imports after argument parsing so that --help is instant.
  from moeqjax.pipeline import distributed
  primary = True
  if args.command in ("pretrain", "qat", "eval"):
    # Before anything asks JAX for its devices.
    distributed.initialize(distributed.from_flags(args.coordinator, args.num_processes,
                                                  args.process_id, args.distributed_timeout))
    primary = distributed.is_primary()
  from moeqjax.pipeline import config as config_io
  from moeqjax.pipeline import runs
  from moeqjax.pipeline import workdirs
  workdir_arg = _path(args.workdir or DEFAULT_WORKDIRS[args.command] or ".")
  # Without --config: the recorded config of the Switch run this continues, else configs/tiny.py.
  config = runs.starting_config(args.command, args.config, workdir=workdir_arg,
                                teacher=_path(getattr(args, "teacher", None)))
  if args.data is not None:
    overrides["data.path"] = args.data
  if getattr(args, "tokenizer", None) is not None:
    overrides["data.tokenizer"] = args.tokenizer
  config_io.apply_overrides(config, overrides)
  teacher = None
  if args.command in ("pretrain", "qat", "ptq", "eval"):
    # The finished runs this phase continues set their sections; --config only the new phase's.
    teacher = runs.continue_config(
        args.command, config, overrides, workdir=workdir_arg,
        teacher=_path(getattr(args, "teacher", None)),
        init_from=_path(getattr(args, "init_from", None)),
        config_given=args.config is not None)
  switch = config_io.is_switch(config)  # the model family, from the model section
  if switch and args.command == "demo" and args.hf_dir is not None:
    raise UserError("`moeqjax demo --hf-dir` imports decoder-only checkpoints; a Switch config "
                    "pretrains its teacher: drop --hf-dir")
  config_io.any_model_config(config)  # validate the model section before any work
  if args.command in ("demo", "pretrain", "qat", "eval"):
    from moeqjax.pipeline.mesh import check_mesh_devices
    check_mesh_devices(config)  # and the mesh against the devices, before data is read
  workdir = _writable_workdir(args.workdir or DEFAULT_WORKDIRS[args.command] or ".")

  if args.command == "demo" and switch:
    from moeqjax.pipeline.switch_demo import format_demo_summary, run_switch_demo
    print("\n" + format_demo_summary(run_switch_demo(config, workdir), workdir))
  elif args.command == "demo":
    from moeqjax.pipeline.demo import run_demo
    metrics = run_demo(config, workdir, hf_dir=args.hf_dir)
    _print_summary(metrics, workdir)
  elif args.command == "pretrain":
    from moeqjax.pipeline.pretrain import pretrain
    state = pretrain(config, workdir, workdirs.load_data(config), resume=args.resume)
    if primary:
      print(f"pretrained {int(state.step)} steps; checkpoint in {workdir / 'ckpt'}")
  elif args.command == "qat":
    from moeqjax.pipeline.qat import qat_from_teacher
    state = qat_from_teacher(config, workdir, teacher, args.allocation,
                             resume=args.resume, init_from=args.init_from)
    if primary:
      print(f"QAT finished at step {int(state.step)}; checkpoint in {workdir / 'ckpt'}")
  elif args.command == "ptq":
    from moeqjax.pipeline.ptq import ptq_from_teacher
    _, report = ptq_from_teacher(config, workdir, teacher, args.method,
                                 args.allocation, args.calib_batches)
    err = report.get("calib_output_error")
    note = (f"; calibration output error {err['gptq']:.4g} (RTN {err['rtn']:.4g})" if err else "")
    print(f"ptq {args.method} finished{note}; checkpoint in {workdir / 'ckpt'}")
  elif args.command == "eval":
    from moeqjax.pipeline.evaluate import evaluate_qat_run
    metrics = evaluate_qat_run(config, workdir, workdirs.teacher_params(config, teacher),
                               control=_path(args.control), teacher=teacher)
    if primary and switch:
      from moeqjax.pipeline.switch_phases import format_summary
      print("\n" + format_summary(metrics, workdir))
    elif primary:
      unit = next(iter(metrics.values()))["unit"]
      _print_summary({"variants": metrics, "unit": unit}, workdir)
  return 0


def _print_summary(metrics: dict, workdir: pathlib.Path):
  from moeqjax.pipeline.evaluate import capacity_note
  unit = metrics.get("unit", "token")
  print(f"\n{'variant':16s} {'bits/' + unit:>12s} {'expert b/w':>10s} {'top-k agree':>11s} "
        f"{'top-1 agree':>11s}")
  for name, r in metrics["variants"].items():
    print(f"{name:16s} {r['bits_per_token']:12.4f} {r['expert_bits_per_weight']:10.3f} "
          f"{r['topk_agree']:11.3f} {r['top1_agree']:11.3f}")
  dropped = capacity_note(metrics["variants"])
  if dropped:
    print(f"\n{dropped}")
  serving = metrics.get("serving")
  if serving:
    print()
    for name, r in serving["packed"].items():
      print(f"packed {name:12s} {r['tensor_bytes']:>12,} bytes ({r['fp_bf16_over_packed']:.2f}x "
            f"smaller than the {r['fp_bf16_model_bytes']:,}-byte bf16 model) in {r['folder']}")
    s = serving["sample"]
    print(f"\npacked {s['variant']}, greedy continuation of a held-out prompt:\n"
          f"{s['prompt']}\u2502{s['continuation']}")
  print(f"\nresults in {workdir}")


def main(argv: list[str] | None = None) -> int:
  from moeqjax.pipeline.errors import USER_ERRORS, TrainingStopped
  argv = sys.argv[1:] if argv is None else argv
  try:
    return run(argv)
  except (UserError, *USER_ERRORS) as e:
    print(f"moeqjax: error: {e}", file=sys.stderr)
    return 2
  except TrainingStopped as e:
    print(f"moeqjax: {e}", file=sys.stderr)
    return 130 if "SIG" in str(e) else 1
  except KeyboardInterrupt:
    print("moeqjax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
