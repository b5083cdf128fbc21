"""Prints the train-step time with in-step router statistics divided by the time without them.

Run:  python benchmarks/stats_overhead.py [--config configs/tiny.py] [--qat] [--repeats 15] [--steps 10]

Both variants are compiled once, then timed in interleaved blocks of `--steps` steps (the order
alternates every repeat so that drift on a shared machine hits both equally); the ratio of the
medians is printed. It never asserts a time (DESIGN.md: timings live in benchmarks/).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.data import sample_batch
from moeqjax.model import default_quant, init_model
from moeqjax.objectives import LossWeights
from moeqjax.pipeline import config as config_io
from moeqjax.train import create_state, jit_train_step, make_optimizer


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=None)
  ap.add_argument("--qat", action="store_true", help="time the QAT step (ternary experts, joint "
                  "objective with the teacher) instead of the full-precision step")
  ap.add_argument("--repeats", type=int, default=15)
  ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
  args = ap.parse_args()
  config = config_io.load_config(args.config)
  cfg = config_io.model_config(config)
  phase = config.qat if args.qat else config.pretrain
  loop, optim = config_io.phase_configs(phase, "qat" if args.qat else "pretrain")
  model, params, _ = init_model(cfg, jax.random.key(0))
  tx = make_optimizer(optim)
  weights = (config_io.loss_weights(config) if args.qat else
             LossWeights(rec=0, kd=0, value=0, struct=0, lb=config.loss.lb, z=config.loss.z))
  quant = default_quant(cfg) if args.qat else None
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 1 << 20).astype(np.uint8)
  batches = [jnp.asarray(sample_batch(tokens, loop.batch_size, loop.seq_len, 0, i))
             for i in range(args.steps)]
  rng = jax.random.key(0)

  variants = {}
  for name, collect in (("with", True), ("without", False)):
    # Fresh buffers per variant: the jitted step donates the whole state.
    state = create_state(jax.tree.map(jnp.copy, params), tx, cfg.num_layers,
                         quant=None if quant is None else jax.tree.map(jnp.copy, quant),
                         teacher_params=jax.tree.map(jnp.copy, params) if args.qat else None)
    fn = jit_train_step(model, tx, weights, collect_stats=collect)
    state, m = fn(state, batches[0], rng)  # compile
    jax.block_until_ready(m)
    variants[name] = [fn, state]

  times = {"with": [], "without": []}
  for r in range(args.repeats):
    order = ("with", "without") if r % 2 == 0 else ("without", "with")
    for name in order:
      fn, state = variants[name]
      t = time.perf_counter()
      for b in batches:
        state, m = fn(state, b, rng)
      jax.block_until_ready((state, m))
      times[name].append((time.perf_counter() - t) / len(batches))
      variants[name][1] = state
  w, wo = statistics.median(times["with"]), statistics.median(times["without"])
  print(f"{'qat' if args.qat else 'full-precision'} step, D={cfg.d_model} L={cfg.num_layers} "
        f"E={cfg.num_experts} k={cfg.top_k}, batch {loop.batch_size}x{loop.seq_len}, "
        f"{args.repeats} interleaved repeats of {args.steps} steps")
  print(f"median step time with stats {w * 1e3:.2f} ms, without {wo * 1e3:.2f} ms")
  print(f"ratio with/without = {w / wo:.4f}")


if __name__ == "__main__":
  main()
