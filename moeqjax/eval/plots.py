"""PNG plots of a demo run: training curves, bits per byte by variant, routing agreement per layer."""

from __future__ import annotations

import pathlib

import matplotlib
import numpy as np

from moeqjax.model.projection_codes import PROJECTIONS, is_per_projection
from moeqjax.quant import formats

matplotlib.use("Agg")  # headless: no display on CI or TPU VMs
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(curves: dict, path: pathlib.Path, unit: str):
  """curves: label -> list of {"step", "train/task"} records (task loss in nats)."""
  import math
  fig, ax = plt.subplots(figsize=(7, 4))
  for label, records in curves.items():
    steps = [r["step"] for r in records if "train/task" in r]
    vals = [r["train/task"] / math.log(2) for r in records if "train/task" in r]
    if steps:
      ax.plot(steps, vals, label=label)
  ax.set_xlabel("step (QAT runs start where pretraining ended)")
  ax.set_ylabel(f"train loss (bits per {unit})")
  ax.set_title("Training curves: pretraining and QAT")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_variants(results: dict, baseline: float, path: pathlib.Path, unit: str):
  """Held-out bits per token of each variant against average expert bits."""
  fig, ax = plt.subplots(figsize=(7, 4))
  names = list(results)
  vals = [results[n]["bits_per_token"] for n in names]
  bars = ax.bar(range(len(names)), vals, color="#4c72b0")
  for bar, n in zip(bars, names):
    ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(),
            f"{results[n]['bits_per_token']:.3f}\n{results[n]['expert_bits_per_weight']:.2f}b/w",
            ha="center", va="bottom", fontsize=8)
  ax.axhline(baseline, color="#c44e52", linestyle="--", label=f"unigram baseline {baseline:.2f}")
  ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
  ax.set_ylabel(f"held-out bits per {unit}")
  ax.set_ylim(0, max(vals + [baseline]) * 1.25)
  ax.set_title("Held-out loss by variant (label: value, expert bits per weight)")
  ax.legend(loc="upper left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_routing(results: dict, path: pathlib.Path, reference: str):
  """Top-k agreement with the reference routing, per layer, for every quantized variant."""
  fig, ax = plt.subplots(figsize=(7, 4))
  for name, r in results.items():
    if name == reference:
      continue
    layers = range(len(r["topk_agree_per_layer"]))
    ax.plot(layers, r["topk_agree_per_layer"], marker="o", label=name)
  ax.set_xlabel("layer")
  ax.set_ylabel("top-k set agreement with full precision")
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title("Routing consistency per layer")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_bit_map(codes_LxE, path: pathlib.Path, title: str):
  """Heat map of expert codes, each cell labelled with its code's name.

  codes [L, E]: rows are layers. Per-projection codes [L, 3, E] (`allocate --target gguf`): rows
  are (layer, projection) pairs in PROJECTIONS order, labelled e.g. "1 w_out".
  """
  codes = np.asarray(codes_LxE)
  if is_per_projection(codes):
    rows = [f"{l} {name}" for l in range(codes.shape[0]) for name in PROJECTIONS]
    codes = codes.reshape(-1, codes.shape[2])
    ylabel = "layer, projection"
  else:
    rows, ylabel = [str(l) for l in range(codes.shape[0])], "layer"
  names = sorted({int(c) for c in codes.ravel()})
  fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * codes.shape[1] + 2), 0.6 * codes.shape[0] + 1.6))
  rank = np.vectorize(names.index)(codes)  # colour by rank: codes 1 and 2 differ as much as 4 and 8
  ax.imshow(rank, cmap="viridis", vmin=0, vmax=max(len(names) - 1, 1), aspect="auto")
  for (l, e), c in np.ndenumerate(codes):
    ax.text(e, l, formats.code_name(int(c)), ha="center", va="center", fontsize=8, color="white")
  ax.set_xticks(range(codes.shape[1]))
  ax.set_yticks(range(codes.shape[0]), rows)
  ax.set_xlabel("expert")
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
