"""One process of the two-process QAT check (tests/train/test_multiprocess.py starts them).

  single SCRATCH        one process, 4 CPU devices: pretrain the teacher (prints "teacher ready"),
                        QAT it into SCRATCH/one; after a line on stdin, resume SCRATCH/moved (a
                        copy of the preempted two-process run) to the end, `moeqjax eval`
                        SCRATCH/one, and print, as JSON, how far the resumed run's final params
                        are from SCRATCH/one's.
  proc I PORT SCRATCH   process I of 2 (2 CPU devices each, jax.distributed on 127.0.0.1:PORT):
                        the same QAT into SCRATCH/two; process 1 gets SIGINT (Ctrl-C) after
                        step 1, passed on as its SIGTERM, so both save at the step JAX's
                        preemption service agrees on and exit 130.
  eval I PORT SCRATCH   process I of 2: `moeqjax eval` of SCRATCH/eval2 (a copy of the finished
                        SCRATCH/one) across both processes.
"""

import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time

import jax
import numpy as np

# Tiny model, 5 QAT steps on a data=4 mesh (the default mesh: data = every device), checkpoints
# every 2 steps. The global batch of 4 rows puts one row on each device.
ARGS = ["--config.model.d_model=16", "--config.model.num_heads=2",
        "--config.model.num_kv_heads=1", "--config.model.head_dim=8", "--config.model.d_ff=16",
        "--config.model.num_experts=4", "--config.model.num_layers=1",
        "--config.model.max_seq_len=16", "--config.quant.scale_init=absmax",
        "--config.pretrain.steps=1", "--config.pretrain.warmup_steps=0",
        "--config.pretrain.batch_size=4",
        "--config.pretrain.seq_len=16", "--config.qat.steps=5", "--config.qat.warmup_steps=1",
        "--config.qat.batch_size=4", "--config.qat.seq_len=16", "--config.qat.log_every=1",
        "--config.qat.ckpt_every=2",
        # 7 windows in batches of 3: rounded up to 4 rows (one per device), the last one padded.
        "--config.eval.seq_len=16", "--config.eval.num_windows=7", "--config.eval.batch_size=3"]


def cli(scratch: pathlib.Path, *argv, allow=(0,)) -> int:
  from moeqjax.cli import main
  common = ["--data", str(scratch / "corpus.txt"), *ARGS]
  code = main([*argv, *common])
  if code not in allow:
    raise SystemExit(f"moeqjax {' '.join(argv)} exited {code}")
  return code


def restored_params(workdir: pathlib.Path, step: int):
  from moeqjax.pipeline.config import apply_overrides, load_config
  from moeqjax.pipeline.mesh import sharded_template
  from moeqjax.pipeline.workdirs import state_template
  from moeqjax.train import Checkpointer
  config = load_config(None)
  apply_overrides(config, dict(a[len("--config."):].split("=", 1) for a in ARGS))
  ckpt = Checkpointer(workdir / "ckpt", 0)
  try:
    state = ckpt.restore(sharded_template(config, state_template(config, "qat")), step)
  finally:
    ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]


def max_rel(a_list, b_list) -> float:
  return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
             for a, b in zip(a_list, b_list))


def single(scratch: pathlib.Path) -> None:
  times = [("start", time.perf_counter())]
  cli(scratch, "pretrain", "--workdir", str(scratch / "teacher"))
  times.append(("teacher", time.perf_counter()))
  print("teacher ready", flush=True)
  cli(scratch, "qat", "--workdir", str(scratch / "one"), "--teacher", str(scratch / "teacher"))
  times.append(("qat", time.perf_counter()))
  sys.stdin.readline()  # the two processes have finished
  times.append(("waited", time.perf_counter()))
  moved = scratch / "moved"
  shutil.copytree(scratch / "two", moved)  # as the preempted processes left it
  cli(scratch, "qat", "--workdir", str(moved), "--teacher", str(scratch / "teacher"), "--resume")
  times.append(("resumed", time.perf_counter()))
  cli(scratch, "eval", "--workdir", str(scratch / "one"), "--teacher", str(scratch / "teacher"))
  times.append(("eval", time.perf_counter()))
  print(json.dumps({
      "devices": jax.device_count(), "processes": jax.process_count(),
      # resumed in one process from the preempted two processes vs one process throughout
      "params_5_moved_vs_one": max_rel(restored_params(moved, 5), restored_params(
          scratch / "one", 5)),
      "seconds": {b[0]: round(b[1] - a[1], 2) for a, b in zip(times, times[1:] + [
          ("restores", time.perf_counter())])},
  }), flush=True)


def two_process_eval(index: int, port: int, scratch: pathlib.Path) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  cli(scratch, "eval", "--workdir", str(scratch / "eval2"), "--teacher", str(scratch / "teacher"),
      "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(index),
      "--distributed-timeout", "60")
  print(json.dumps({"process": jax.process_index(), "devices": jax.device_count()}), flush=True)


def sigint_after_step_1(metrics: pathlib.Path) -> None:
  while not (metrics.exists() and '"step": 1' in metrics.read_text()):
    time.sleep(0.05)
  os.kill(os.getpid(), signal.SIGINT)


def proc(index: int, port: int, scratch: pathlib.Path) -> None:
  t0 = time.perf_counter()
  # CPU devices of several processes talk through gloo (set before the backend starts).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if index == 1:
    # A Ctrl-C on this host alone, once step 1 is logged (by process 0).
    threading.Thread(target=sigint_after_step_1, args=(scratch / "two" / "metrics.jsonl",),
                     daemon=True).start()
  code = cli(scratch, "qat", "--workdir", str(scratch / "two"), "--teacher",
             str(scratch / "teacher"), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
             "2", "--process-id", str(index), "--distributed-timeout", "60", allow=(130,))
  print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                    "local_devices": jax.local_device_count(), "devices": jax.device_count(),
                    "exit": code, "seconds": round(time.perf_counter() - t0, 2)}),
        flush=True)


if __name__ == "__main__":
  if sys.argv[1] == "single":
    single(pathlib.Path(sys.argv[2]))
  elif sys.argv[1] == "eval":
    two_process_eval(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
  else:
    proc(int(sys.argv[2]), int(sys.argv[3]), pathlib.Path(sys.argv[4]))
