"""Prints the relative weight error of every expert code under scale_init="absmax" and "mse".

Run:  python benchmarks/scale_error.py --teacher WORKDIR/pretrain [--config configs/tiny.py]

Relative error = sum ||Q(W) - W||^2 / sum ||W||^2 over all routed expert weights of the teacher
(w_in, w_gate, w_out of every layer and expert), with the config's granularity and fp16 scales:
ternary (absmean and TWN), symmetric and asymmetric int2, int3, int4.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import numpy as np

from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.workdirs import teacher_params
from moeqjax.quant import quantize_dequantize

ROWS = (("ternary (absmean)", 1, {}), ("ternary (twn)", 1, {"ternary_method": "twn"}),
        ("int2 symmetric", 2, {}), ("int2 asymmetric", 2, {"symmetric": False}),
        ("int3 symmetric", 3, {}), ("int4 symmetric", 4, {}))


def relative_error(weights, code, spec) -> float:
  num = den = 0.0
  for w in weights:
    w_q = np.asarray(quantize_dequantize(w, np.full(w.shape[:1], code, np.int32), spec))
    num += float(np.sum((w_q.astype(np.float64) - w) ** 2))
    den += float(np.sum(w.astype(np.float64) ** 2))
  return num / den


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default=None)
  ap.add_argument("--teacher", required=True, help="a finished `moeqjax pretrain` workdir")
  args = ap.parse_args()
  config = config_io.load_config(args.config)
  cfg = config_io.model_config(config)
  params = teacher_params(config, pathlib.Path(args.teacher))
  weights = [np.asarray(params[f"layers_{l}"]["moe"][n], np.float32)
             for l in range(cfg.num_layers) for n in ("w_in", "w_gate", "w_out")]
  spec = cfg.quant.spec()
  print(f"| code | absmax | mse | mse / absmax |  ({spec.granularity}, fp16 scales)")
  print("|---|---|---|---|")
  for name, code, change in ROWS:
    errs = [relative_error(weights, code, dataclasses.replace(spec, scale_init=init, **change))
            for init in ("absmax", "mse")]
    print(f"| {name} | {errs[0]:.4f} | {errs[1]:.4f} | {errs[1] / errs[0]:.3f} |")


if __name__ == "__main__":
  main()
