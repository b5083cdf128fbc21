"""Prints QAT-step / full-precision-step time and grouped / dense dispatch time for the demo model.

Run:  python benchmarks/step_overhead.py [--config configs/tiny.py] [--repeats 5]
Ratios come from one run with interleaved repeats (median), so machine noise hits both sides alike.
Absolute times are printed for context only; they mean something on an accelerator, not here.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.data import sample_batch
from moeqjax.model import MoETransformer, default_quant, init_model
from moeqjax.model.dispatch import dense_experts, ragged_experts
from moeqjax.objectives import LossWeights
from moeqjax.pipeline import config as config_io
from moeqjax.train import create_state, make_optimizer
from moeqjax.train.step import train_step


def _time(fn, *args, inner: int) -> float:
  out = fn(*args)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(inner):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / inner


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=None)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--inner", type=int, default=3)
  args = parser.parse_args()
  config = config_io.load_config(args.config)
  cfg = config_io.model_config(config)
  _, optim = config_io.phase_configs(config.qat, "qat")
  weights = config_io.loss_weights(config)
  model = MoETransformer(cfg)
  _, params, _ = init_model(cfg, jax.random.key(0))
  tx = make_optimizer(optim)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 100_000).astype(np.uint8)
  batch = jnp.asarray(sample_batch(tokens, config.qat.batch_size, config.qat.seq_len, 0, 0))
  rng = jax.random.key(0)

  # Train steps are not donated here so the same state can be fed repeatedly.
  fp_step = jax.jit(functools.partial(train_step, model=model, tx=tx, weights=LossWeights(
      rec=0, kd=0, value=0, struct=0, lb=weights.lb, z=weights.z)))
  qat_step = jax.jit(functools.partial(train_step, model=model, tx=tx, weights=weights))
  fp_state = create_state(params, tx, cfg.num_layers)
  qat_state = create_state(params, tx, cfg.num_layers, quant=default_quant(cfg),
                           teacher_params=params)

  # Dispatch alone, forward + backward through the expert weights, at the demo's token count.
  t = config.qat.batch_size * config.qat.seq_len
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(t, cfg.d_model)), jnp.float32)
  w_in = jnp.asarray(r.normal(size=(cfg.num_experts, cfg.d_model, cfg.d_ff)) * 0.05, jnp.float32)
  w_gate = jnp.asarray(r.normal(size=w_in.shape) * 0.05, jnp.float32)
  w_out = jnp.asarray(r.normal(size=(cfg.num_experts, cfg.d_ff, cfg.d_model)) * 0.05, jnp.float32)
  probs = jax.nn.softmax(jnp.asarray(r.normal(size=(t, cfg.num_experts)), jnp.float32))
  gates, idx = jax.lax.top_k(probs, cfg.top_k)

  def dispatch_loss(fn):
    return jax.jit(jax.value_and_grad(
        lambda wi, wg, wo: jnp.sum(fn(x, wi, wg, wo, gates, idx) ** 2), argnums=(0, 1, 2)))

  ragged, dense = dispatch_loss(ragged_experts), dispatch_loss(dense_experts)

  samples = {"fp": [], "qat": [], "ragged": [], "dense": []}
  for _ in range(args.repeats):
    samples["fp"].append(_time(fp_step, fp_state, batch, rng, inner=args.inner))
    samples["qat"].append(_time(qat_step, qat_state, batch, rng, inner=args.inner))
    samples["ragged"].append(_time(ragged, w_in, w_gate, w_out, inner=args.inner))
    samples["dense"].append(_time(dense, w_in, w_gate, w_out, inner=args.inner))
  med = {k: statistics.median(v) for k, v in samples.items()}
  print(f"device: {jax.devices()[0].platform} ({jax.devices()[0].device_kind}); model D={cfg.d_model} "
        f"L={cfg.num_layers} E={cfg.num_experts} k={cfg.top_k} F={cfg.d_ff}; batch "
        f"{config.qat.batch_size}x{config.qat.seq_len}; median of {args.repeats}x{args.inner}")
  print(f"full-precision step {med['fp'] * 1e3:.1f} ms, QAT step {med['qat'] * 1e3:.1f} ms, "
        f"grouped dispatch {med['ragged'] * 1e3:.2f} ms, dense dispatch {med['dense'] * 1e3:.2f} ms")
  print(f"QAT step / full-precision step: {med['qat'] / med['fp']:.3f}")
  print(f"grouped (ragged_dot) dispatch / dense dispatch: {med['ragged'] / med['dense']:.3f}")


if __name__ == "__main__":
  main()
