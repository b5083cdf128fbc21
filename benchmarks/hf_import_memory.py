"""Peak host memory (ru_maxrss) of `moeqjax.from_hf` on a synthetic ~1.2 GB sharded Mixtral-layout checkpoint.

Run:  python benchmarks/hf_import_memory.py [--layers 6] [--dtype float32]
Prints the checkpoint size, the imported params' size and the peak RSS of the importing process
(a fresh subprocess, so writing the checkpoint does not count).
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

from moeqjax.convert.hf_config import hf_config_to_model_config
from moeqjax.convert.layout import entries
from moeqjax.convert.hf_config import FAMILIES
from moeqjax.convert.safetensors_io import StreamingWriter

_CHILD = r"""
import resource, sys, time, jax
import moeqjax
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
model, params = moeqjax.from_hf(sys.argv[1], dtype=sys.argv[2])
jax.block_until_ready(params)
n = sum(x.nbytes for x in jax.tree.leaves(params))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(f"{n} {base} {peak} {time.time() - t:.1f}")
"""


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", type=int, default=6)
  ap.add_argument("--dtype", default="float32")
  args = ap.parse_args()
  hf = {"model_type": "mixtral", "vocab_size": 32000, "hidden_size": 1024,
        "intermediate_size": 2048, "num_hidden_layers": args.layers, "num_attention_heads": 8,
        "num_key_value_heads": 2, "num_local_experts": 8, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096}
  cfg = hf_config_to_model_config(hf)
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    (tmp / "config.json").write_text(json.dumps(hf))
    ents = entries(cfg, FAMILIES["mixtral"])
    per_shard = 1 + len(ents) // 4
    rng = np.random.default_rng(0)
    weight_map = {}
    for s in range(0, len(ents), per_shard):
      chunk = ents[s:s + per_shard]
      name = f"model-{s // per_shard + 1:05d}.safetensors"
      w = StreamingWriter(tmp / name, [(e.hf_name, e.hf_shape, np.float32) for e in chunk])
      for e in chunk:
        w.write(e.hf_name, rng.standard_normal(e.hf_shape, np.float32) * 0.02)
        weight_map[e.hf_name] = name
      w.close()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp), args.dtype], check=True,
                         capture_output=True, text=True).stdout.split()
    n, base, peak, secs = int(out[0]), int(out[1]), int(out[2]), out[3]
    mib = 2**20
    print(f"checkpoint on disk: {size / mib:.0f} MiB (float32, 4 shards); imported params "
          f"({args.dtype}): {n / mib:.0f} MiB")
    print(f"peak RSS of the importing process: {peak * 1024 / mib:.0f} MiB (after imports, "
          f"before loading: {base * 1024 / mib:.0f} MiB); load took {secs} s")
    print(f"peak RSS minus baseline / params size: {(peak - base) * 1024 / n:.2f}x")


if __name__ == "__main__":
  main()
