#!/usr/bin/env python3
"""Cloud TPU lifecycle for one `moeqjax` run: create, install, launch, logs, delete (gcloud only)."""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys

# The TPU VM software for each TPU generation (Cloud TPU's "runtime versions" for JAX).
RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
REMOTE_DIR = "moeqjax"  # the project's folder in each worker's home
LOG = "moeqjax_run.log"  # each worker's log, in its home
DISTRIBUTED_COMMANDS = ("pretrain", "qat", "eval")  # the moeqjax commands that take --coordinator


class UsageError(ValueError):
  """Bad flags; printed as one line."""


def runtime_version(accelerator: str, given: str | None) -> str:
  """`given`, or the runtime version for the accelerator's generation (e.g. v5p-64 -> v5p)."""
  if given:
    return given
  generation = accelerator.split("-")[0]
  if generation not in RUNTIME_VERSIONS:
    raise UsageError(f"--accelerator {accelerator}: no default runtime version for {generation!r} "
                     f"(known: {', '.join(RUNTIME_VERSIONS)}); pass --runtime-version")
  return RUNTIME_VERSIONS[generation]


def _where(args) -> list[str]:
  where = [f"--zone={args.zone}"]
  return where + ([f"--project={args.project}"] if args.project else [])


def _ssh(args, worker: str, command: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *_where(args),
          f"--worker={worker}", f"--command={command}"]


def create_commands(args) -> list[list[str]]:
  """One TPU VM now (tpu-vm create), or a queued resource that waits for capacity (--queued)."""
  version = runtime_version(args.accelerator, args.runtime_version)
  spot = ["--spot"] if args.spot else []
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *_where(args),
             f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
             f"--runtime-version={version}", *spot]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args),
           f"--accelerator-type={args.accelerator}", f"--version={version}", *spot]]


def install_commands(args) -> list[list[str]]:
  """Copies the local checkout to every worker and installs it with JAX for TPU."""
  source = pathlib.Path(args.source).expanduser().resolve()
  if not (source / "pyproject.toml").is_file():
    raise UsageError(f"--source {source} is not the moeqjax checkout (no pyproject.toml)")
  pip = (f"python3 -m pip install --upgrade pip && python3 -m pip install -e ~/{REMOTE_DIR} "
         "'jax[tpu]'")
  return [_ssh(args, "all", f"rm -rf ~/{REMOTE_DIR}"),
          ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", str(source),
           f"{args.name}:~/{REMOTE_DIR}", *_where(args), "--worker=all"],
          _ssh(args, "all", pip)]


def launch_commands(args) -> list[list[str]]:
  """Starts the same `moeqjax ...` on every worker, detached, its output in ~/LOG.

  On a TPU VM every worker's JAX finds the others from the TPU metadata, so the command line is the
  same on all of them: `pretrain`, `qat` and `eval` get `--coordinator auto` (jax.distributed.initialize()
  with no arguments) unless the command names a coordinator.
  """
  if not args.moeqjax_args:
    raise UsageError("give the moeqjax command after --, e.g. -- qat --config configs/mixtral_8x7b.py "
                     "--teacher DIR --workdir /mnt/shared/run")
  env = " ".join(f"{k}={shlex.quote(v)}" for k, v in (kv.split("=", 1) for kv in args.env))
  argv = list(args.moeqjax_args)
  if argv[0] in DISTRIBUTED_COMMANDS and not any(a.startswith("--coordinator") for a in argv):
    argv[1:1] = ["--coordinator", "auto"]
  run = " ".join(shlex.quote(a) for a in argv)
  command = (f"cd ~/{REMOTE_DIR} && {env + ' ' if env else ''}nohup python3 -m moeqjax.cli {run} "
             f"> ~/{LOG} 2>&1 < /dev/null &")
  return [_ssh(args, "all", command)]


def logs_commands(args) -> list[list[str]]:
  """Follows worker 0's log (metrics and the progress bar come from process 0 only)."""
  return [_ssh(args, "0", f"tail -n 200 -f ~/{LOG}")]


def delete_commands(args) -> list[list[str]]:
  if args.queued:
    return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args),
             "--force", "--quiet"]]
  return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args), "--quiet"]]


ACTIONS = {"create": create_commands, "install": install_commands, "launch": launch_commands,
           "logs": logs_commands, "delete": delete_commands}


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="tpu_scripts/tpu.py", description=__doc__)
  sub = p.add_subparsers(dest="action", required=True)
  for action, fn in ACTIONS.items():
    s = sub.add_parser(action, help=fn.__doc__.splitlines()[0] if fn.__doc__ else action)
    s.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    s.add_argument("--zone", required=True, help="e.g. us-east5-a")
    s.add_argument("--project", default="", help="default: gcloud's configured project")
    s.add_argument("--dry-run", action="store_true", help="print every gcloud command, run none")
    if action in ("create", "delete"):
      s.add_argument("--queued", action="store_true",
                     help="a queued resource (waits for capacity) instead of a TPU VM now")
    if action == "create":
      s.add_argument("--accelerator", required=True, help="e.g. v5p-64, v5litepod-16, v4-32")
      s.add_argument("--runtime-version", default=None,
                     help=f"default by generation: {RUNTIME_VERSIONS}")
      s.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    if action == "install":
      s.add_argument("--source", default=str(pathlib.Path(__file__).resolve().parents[1]),
                     help="the local moeqjax checkout to copy (default: this one)")
    if action == "launch":
      s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment for the run on every worker (repeatable)")
      s.add_argument("moeqjax_args", nargs=argparse.REMAINDER,
                     help="after --: the moeqjax subcommand and its flags")
  return p


def main(argv: list[str] | None = None) -> int:
  args = parser().parse_args(argv)
  if getattr(args, "moeqjax_args", None) and args.moeqjax_args[0] == "--":
    args.moeqjax_args = args.moeqjax_args[1:]
  for kv in getattr(args, "env", []):
    if "=" not in kv:
      print(f"tpu.py: error: --env {kv!r} is not KEY=VALUE", file=sys.stderr)
      return 2
  try:
    commands = ACTIONS[args.action](args)
  except UsageError as e:
    print(f"tpu.py: error: {e}", file=sys.stderr)
    return 2
  for command in commands:
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      done = subprocess.run(command, check=False)
      if done.returncode != 0:
        print(f"tpu.py: error: {command[0]} exited with {done.returncode}; nothing after it ran",
              file=sys.stderr)
        return done.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
