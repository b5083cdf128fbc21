"""The `stats`, `allocate` and `study` subcommands (argument parsers are import-light; work is lazy)."""

from __future__ import annotations

import pathlib

from moeqjax.study.rules import rule_bytes_text

COMMANDS = ("stats", "allocate", "study")
METHOD_NAMES = ("paper_combined", "paper_router", "exact", "frequency", "gate_weight", "mc_moe",
                "uniform", "random")


def add_parsers(sub) -> None:
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
      "the largest single code within it.")
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
  p.add_argument("--choices", default="1,2,3,4,8",
                 help="candidate codes, comma-separated (1 = ternary, 2/3/4/8 = intN)")
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


def run_command(args, overrides: dict[str, str]) -> int:
  from moeqjax import config_io
  config = config_io.load_config(args.config)
  config_io.apply_overrides(config, overrides)
  if args.command == "stats":
    from moeqjax.stats_report import format_table, write_stats
    record = write_stats(config, pathlib.Path(args.workdir))
    print(format_table(record))
    print(f"\nwritten {pathlib.Path(args.workdir) / 'router_stats.json'}")
  elif args.command == "allocate":
    from moeqjax.stats_report import restore_latest
    from moeqjax.study.allocation import AllocationError, allocate, write_allocation
    try:
      choices = tuple(int(c) for c in args.choices.split(","))
    except ValueError:
      raise AllocationError(f"--choices {args.choices!r} must be comma-separated codes, e.g. "
                            "1,2,3,4,8") from None
    levels = None
    if args.levels is not None:
      try:
        levels = tuple(int(c) for c in args.levels.split(","))
      except ValueError:
        raise AllocationError(f"--levels {args.levels!r} must be two comma-separated codes, high "
                              "then low, e.g. 3,1") from None
    config, phase, state = restore_latest(config, pathlib.Path(args.workdir))
    cfg = config_io.model_config(config)
    result = allocate(args.method, cfg, state.params, state.stats, args.budget, args.budget_unit,
                      choices=choices, seed=args.seed, levels=levels)
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "allocation.json"
    write_allocation(out, result)
    a = result.achieved
    print(f"{args.method}: {a['bytes']} of {result.budget_bytes} budget bytes, "
          f"{a['bits_per_weight']:.4f} bits per expert weight (scales included), "
          f"{a['code_bits']:.4f} code bits; written {out}")
    for l, row in enumerate(result.codes_LxE):
      print(f"  layer {l}: " + " ".join(str(int(c)) for c in row))
  elif args.command == "study":
    from moeqjax.study.grid import run_study
    run_study(config, pathlib.Path(args.workdir), quick=args.quick, config_path=args.config)
  return 0
