"""Weight bytes of real MoE models as GGUF files at bf16, Q4_0, ternary experts and a 2.5-bit mix, and which memory sizes they fit.

Run:  python benchmarks/deploy_memory.py [--json PATH]

Counted from the public configs in configs/ (mixtral_8x7b, qwen3_30b_a3b, olmoe_1b_7b) with the
project's own shapes (moeqjax.convert.plan: jax.eval_shape, nothing allocated) and ggml's block
sizes (moeqjax.convert.gguf_blocks.BLOCKS: scales included). Only the routed experts change
between rows: attention, shared experts, router, embeddings and lm_head stay at 2 bytes per weight
(F16, as `moeqjax export --format gguf --fp-dtype f16` writes them; norms are counted at 2 bytes
too, a rounding error at this scale). Rows:
  bf16        every weight at 2 bytes
  Q4_0        experts int4 (int2/int3 also widen to Q4_0 in GGUF): 18 bytes per 32 weights
  TQ2_0       ternary experts: 66 bytes per 256 weights
  TQ1_0       ternary experts: 54 bytes per 256 weights
  mix 2.5     per layer, the experts of the first n layers at Q4_0 and the rest at TQ1_0, n the
              largest count whose expert bits per weight stay within 2.5 (block scales included);
              GGUF holds one type per stacked expert tensor, so a mix is per layer, not per expert
Weights only: the KV cache, activations and the runtime's own buffers come on top, so a model
"fits" a memory size here only if its weights take at most 90% of it.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flax.core import meta  # noqa: E402
from jax import tree_util  # noqa: E402

from moeqjax.convert.gguf_blocks import BLOCKS  # noqa: E402
from moeqjax.convert.plan import _group, abstract_variables  # noqa: E402
from moeqjax.pipeline import config as config_io  # noqa: E402

CONFIGS = ("mixtral_8x7b", "qwen3_30b_a3b", "olmoe_1b_7b")
MEMORY_GB = (8, 16, 24, 80)
HEADROOM = 0.9  # the share of a memory size the weights may take
MIX_BITS = 2.5


def _bytes_per_weight(ggml_type: str) -> float:
  per_block, nbytes = BLOCKS[ggml_type]
  return nbytes / per_block


def counts(cfg) -> dict:
  """Weights per group: experts per layer and everything else (shapes only)."""
  params = meta.unbox(abstract_variables(cfg))["params"]
  experts, other = 0, 0
  for path, leaf in tree_util.tree_flatten_with_path(params)[0]:
    names = tuple(getattr(k, "key", str(k)) for k in path)
    n = int(np.prod(leaf.shape))
    if _group(names) == "experts" and names[-1] in ("w_in", "w_gate", "w_out"):
      experts += n
    else:
      other += n
  return {"experts": experts, "other": other, "layers": cfg.num_layers,
          "rows_fit_256": all(d % 256 == 0 for d in (cfg.d_model, cfg.d_ff))}


def rows(c: dict) -> dict:
  """Total GGUF weight bytes of each row."""
  other = 2 * c["other"]
  per_layer = c["experts"] / c["layers"]
  q4, tq1 = _bytes_per_weight("Q4_0"), _bytes_per_weight("TQ1_0")
  # Layers at Q4_0 such that the expert bits per weight stay within MIX_BITS.
  n_q4 = math.floor(c["layers"] * (MIX_BITS / 8 - tq1) / (q4 - tq1))
  mix = (n_q4 * q4 + (c["layers"] - n_q4) * tq1) * per_layer
  out = {"bf16": 2 * (c["experts"] + c["other"]),
         "Q4_0": other + q4 * c["experts"],
         "TQ2_0": other + _bytes_per_weight("TQ2_0") * c["experts"],
         "TQ1_0": other + tq1 * c["experts"],
         f"mix {MIX_BITS}": other + mix}
  return {k: int(round(v)) for k, v in out.items()}, n_q4


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default=None, help="also write the table as JSON here")
  args = parser.parse_args(argv)
  table = {}
  print(f"| model | experts / other weights | row | GB | expert bits/w | fits "
        f"({', '.join(str(m) for m in MEMORY_GB)} GB) |")
  print("|---|---|---|---|---|---|")
  for name in CONFIGS:
    cfg = config_io.model_config(config_io.load_config(ROOT / "configs" / f"{name}.py"))
    c = counts(cfg)
    byte_rows, n_q4 = rows(c)
    table[name] = {"counts": c, "bytes": byte_rows, "mix_layers_q4_0": n_q4}
    for row, total in byte_rows.items():
      expert_bits = 8 * (total - 2 * c["other"]) / c["experts"]  # the rows differ in experts only
      fits = " ".join("yes" if total <= HEADROOM * m * 1e9 else "no" for m in MEMORY_GB)
      label = row if not row.startswith("mix") else f"{row} ({n_q4}/{c['layers']} layers Q4_0)"
      print(f"| {name} | {c['experts'] / 1e9:.2f}B / {c['other'] / 1e9:.2f}B | {label} | "
            f"{total / 1e9:.1f} | {expert_bits:.2f} | {fits} |")
    if not c["rows_fit_256"]:
      print(f"  note: {name}: a row length is not a multiple of 256, so TQ1_0/TQ2_0 cannot hold "
            "its experts")
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(table, indent=2) + "\n")


if __name__ == "__main__":
  main()
