"""Decode and prefill speed of packed low-bit MoE weights against bf16, side by side in one run.

Run:  python benchmarks/decode_speed.py            (a 403 MB-bf16-expert model: weights dominate)
      python benchmarks/decode_speed.py --small    (a quick check of the script itself)

For bf16, packed ternary, packed int2, packed int4 and a mixed 2.5-bit allocation (half the experts
of each layer ternary, half int3) it prints resident weight bytes, prefill tokens/s, and decode
tokens/s at batch 1 and batch 16, each with its ratio to bf16, and the roofline ratio (bf16 bytes /
packed bytes read per decoded token) beside the measured one. Weights are random: speed does not
depend on what they learned. Every variant runs the same modules (moeqjax.model) with the same
activation dtype; packed weights are dequantized inside the jitted step, and at batch 1 only the
selected experts' packed rows are read. Absolute numbers mean something on an accelerator; on a
CPU, read the ratios.
"""

from __future__ import annotations

import argparse
import math
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.model import default_quant, set_expert_codes
from moeqjax.model import ModelConfig, MoETransformer, QuantRules, init_model
from moeqjax.quant import weight_bytes
from moeqjax.serve import generate, load_packed, pack


def _variants(num_experts: int):
  half = num_experts // 2
  return {
      "bf16": None,
      "ternary": [1] * num_experts,
      "int2": [2] * num_experts,
      "int4": [4] * num_experts,
      "mixed 2.5b": [1] * half + [3] * (num_experts - half),
  }


def _bytes_read_per_token(cfg: ModelConfig, codes_E, batch: int) -> float:
  """Weight bytes one decode step reads, per token: the roofline's denominator.

  At batch 1 (fewer (token, expert) pairs than experts) a step reads k experts per layer, each at
  the width of the widest code in its layer; at larger batches it reads every expert once, each at
  its own code. Non-expert weights are read once per step at bf16;
  the embedding contributes one row per token.
  """
  spec = cfg.quant.spec()
  d, f, e, k = cfg.d_model, cfg.d_ff, cfg.num_experts, cfg.top_k
  shapes = ((d, f), (d, f), (f, d))

  def expert(code):
    return sum(weight_bytes(s, code, spec) for s in shapes)

  if codes_E is None:
    per_layer = (k if batch * k < e else e) * expert(0)
  elif batch * k < e:
    per_layer = k * max(expert(c) for c in set(codes_E))
  else:
    per_layer = sum(expert(c) for c in codes_E)
  h, g, a = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = 2 * (d * h * a * 2 + d * g * a * 2)
  router = 2 * d * e
  other = cfg.num_layers * (attn + router) + 2 * d * cfg.vocab_size
  return (cfg.num_layers * per_layer + other) / batch + 2 * d


def _resident_bytes(variables) -> int:
  return sum(int(x.nbytes) for x in jax.tree.leaves(variables))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="a tiny model, to check the script")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                      help="activation dtype of every variant (default bfloat16)")
  parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed per run")
  parser.add_argument("--prompt", type=int, default=128, help="prefill length (batch 1)")
  args = parser.parse_args()

  if args.small:
    dims = dict(d_model=128, d_ff=256, num_layers=2, num_experts=8, num_heads=4, num_kv_heads=2,
                head_dim=32)
  else:  # 4 x 8 experts x 3 x 1024 x 2048 = 201M expert weights, 403 MB at bf16
    dims = dict(d_model=1024, d_ff=2048, num_layers=4, num_experts=8, num_heads=8, num_kv_heads=4,
                head_dim=128)
  cfg = ModelConfig(vocab_size=256, top_k=2, max_seq_len=args.prompt + args.new_tokens + 8,
                    dtype=args.dtype, quant=QuantRules(expert_code=1, granularity="channel"),
                    **dims)
  model = MoETransformer(cfg)
  _, params, _ = init_model(cfg, jax.random.key(0))
  expert_weights = cfg.num_layers * cfg.num_experts * 3 * cfg.d_model * cfg.d_ff
  print(f"model: {dims}, top_k=2, activations {args.dtype}; {expert_weights / 1e6:.0f}M expert "
        f"weights = {2 * expert_weights / 2**20:.0f} MiB at bf16; device {jax.devices()[0]}")

  rng = np.random.RandomState(0)
  prompt_1 = rng.randint(0, 256, (1, args.prompt))
  prompt_16 = rng.randint(0, 256, (16, 16))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name, codes in _variants(cfg.num_experts).items():
      if codes is None:
        variables = {"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)}
      else:
        quant = set_expert_codes(default_quant(cfg), [codes] * cfg.num_layers)
        pack(cfg, params, quant, f"{tmp}/{name.replace(' ', '_')}")
        variables = load_packed(f"{tmp}/{name.replace(' ', '_')}").variables
      b1 = generate(model, variables, prompt_1, args.new_tokens)
      b16 = generate(model, variables, prompt_16, args.new_tokens)
      rows.append({
          "name": name, "bytes": _resident_bytes(variables),
          "read_1": _bytes_read_per_token(cfg, codes, 1),
          "read_16": _bytes_read_per_token(cfg, codes, 16),
          "prefill": b1.prefill_tokens_per_s, "decode_1": b1.decode_tokens_per_s,
          "decode_16": b16.decode_tokens_per_s})
      print(f"  {name}: done (compile {b1.compile_s + b16.compile_s:.1f} s)", flush=True)
      del variables

  base = rows[0]
  head = (f"{'variant':12s} {'resident MiB':>12s} {'x bf16':>7s} | {'prefill tok/s':>13s} "
          f"{'x':>6s} | {'b1 decode tok/s':>15s} {'x':>6s} {'roofline x':>10s} | "
          f"{'b16 decode tok/s':>16s} {'x':>6s} {'roofline x':>10s}")
  print("\n" + head + "\n" + "-" * len(head))
  for r in rows:
    print(f"{r['name']:12s} {r['bytes'] / 2**20:12.1f} {base['bytes'] / r['bytes']:7.2f} | "
          f"{r['prefill']:13,.0f} {r['prefill'] / base['prefill']:6.2f} | "
          f"{r['decode_1']:15,.1f} {r['decode_1'] / base['decode_1']:6.2f} "
          f"{base['read_1'] / r['read_1']:10.2f} | "
          f"{r['decode_16']:16,.1f} {r['decode_16'] / base['decode_16']:6.2f} "
          f"{base['read_16'] / r['read_16']:10.2f}")
  mixed = next(r for r in rows if r["name"].startswith("mixed"))
  print(f"\nmixed 2.5-bit at batch 1: {mixed['decode_1'] / base['decode_1']:.2f}x bf16 decode "
        f"(goal on an H100: >= 3x; roofline {base['read_1'] / mixed['read_1']:.2f}x for this "
        f"implementation, which reads each selected expert at its layer's widest code)")
  if math.isnan(base["decode_1"]):
    print("(decode ran a single step: raise --new-tokens)")


if __name__ == "__main__":
  main()
