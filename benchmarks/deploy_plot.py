"""Plots decode speed against file bytes from a `deploy_speed.py --json` file, one panel per thread count.

Run:  python benchmarks/deploy_speed.py --json deploy.json
      python benchmarks/deploy_plot.py deploy.json docs/results/deploy_speed_vs_bytes.png
Each point is a (runtime, row) median over rounds, with a bar from the slowest to the fastest round.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MARKERS = {"llama.cpp": "o", "moeqjax JAX": "s"}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("json", help="the file `deploy_speed.py --json` wrote")
  parser.add_argument("out", help="the PNG to write")
  args = parser.parse_args(argv)
  data = json.loads(pathlib.Path(args.json).read_text())
  threads = sorted({r["threads"] for r in data["rows"]})
  fig, axes = plt.subplots(1, len(threads), figsize=(6 * len(threads), 4.5), squeeze=False)
  for ax, n in zip(axes[0], threads):
    for runtime, marker in MARKERS.items():
      rows = [r for r in data["rows"] if r["threads"] == n and r["runtime"] == runtime]
      for r in rows:
        mib, d = r["file_bytes"] / 2**20, r["decode"]
        ax.errorbar(mib, d["median"], yerr=[[d["median"] - d["min"]], [d["max"] - d["median"]]],
                    fmt=marker, capsize=3, color="C0" if runtime == "llama.cpp" else "C1")
        ax.annotate(r["name"], (mib, d["median"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("file MiB (log)")
    ax.set_ylabel("decode tokens/s, batch 1")
    ax.set_title(f"{n} thread{'s' if n > 1 else ''}: llama.cpp (circles), moeqjax JAX (squares)",
                 fontsize=9)
    ax.grid(alpha=0.3)
  s = data["settings"]
  fig.suptitle(f"random MoE D={s['d_model']}, F={s['d_ff']}, E={s['experts']}, k={s['top_k']}, "
               f"{s['layers']} layers; {data['machine']['cpu']}", fontsize=9)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)


if __name__ == "__main__":
  main()
