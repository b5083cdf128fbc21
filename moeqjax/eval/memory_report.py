"""True weight memory of a model under its quant codes: experts and the whole model, stated separately."""

from __future__ import annotations

import math

import jax
import numpy as np

from moeqjax.model import ModelConfig, expert_codes
from moeqjax.model.projection_codes import by_projection, is_per_projection
from moeqjax.quant import expert_bytes, weight_bytes
from moeqjax.quant.clip import is_clip_param

_FP_BYTES = 2  # unquantized tensors are counted at bf16, the storage format of exports
_EXPERT_PARAMS = ("w_in", "w_gate", "w_out")


def expert_shapes(cfg: ModelConfig) -> dict:
  """One expert's [in, out] weight shapes."""
  d, f = cfg.d_model, cfg.d_ff
  shapes = {"w_in": (d, f), "w_gate": (d, f), "w_out": (f, d)}
  if getattr(cfg, "expert_act", "swiglu") != "swiglu":  # ReLU experts (Switch): no gate
    del shapes["w_gate"]
  return shapes


def _codes_at(quant, names):
  node = quant
  for name in names:
    if not isinstance(node, dict) or name not in node:
      return None
    node = node[name]
  return node


def model_memory(cfg: ModelConfig, params, quant) -> dict:
  """Packed bytes of the expert weights and of every weight in the model.

  Args:
    cfg: the model config (shapes and the quantization spec).
    params: the parameters (shapes only are read; learned clip ratios are not counted, they are
      folded into the expert scales).
    quant: the `quant` collection, or None for the full-precision model.

  Returns:
    {"expert_bytes", "expert_bits_per_weight" (scales included), "expert_code_bits" (mean
     storage bits of the codes, scales excluded), "model_bytes", "model_bits_per_weight",
     "num_expert_weights", "num_weights"}.
  """
  spec = cfg.quant.spec()
  num_layers, num_experts = cfg.num_layers, cfg.num_experts
  if quant is None:
    codes = np.zeros((num_layers, num_experts), np.int32)
  else:
    codes = expert_codes(quant, num_layers)
    if is_per_projection(codes):
      codes = by_projection(codes)
  experts = expert_bytes(expert_shapes(cfg), codes, spec)

  other_bytes, other_weights = 0, 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [p.key for p in path]
    # Learned clip ratios are folded into the stored scales: they are not weights of their own.
    if names[-1] in _EXPERT_PARAMS or is_clip_param(names[-1]):
      continue
    size = math.prod(leaf.shape)
    other_weights += size
    code = None
    if quant is not None and names[-1] == "kernel":
      code = _codes_at(quant, names[:-1] + ["bits"])
    if code is None or int(code) == 0:
      other_bytes += _FP_BYTES * size
    else:
      other_bytes += weight_bytes(leaf.shape, int(code), spec)
  num_weights = experts["num_weights"] + other_weights
  model_bytes = experts["total_bytes"] + other_bytes
  return {
      "expert_bytes": experts["total_bytes"],
      "expert_bits_per_weight": experts["bits_per_weight"],
      "expert_code_bits": experts["avg_code_bits"],
      "num_expert_weights": experts["num_weights"],
      "model_bytes": model_bytes,
      "model_bits_per_weight": 8.0 * model_bytes / num_weights,
      "num_weights": num_weights,
  }
