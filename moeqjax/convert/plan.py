"""`moeqjax plan`: parameter counts, weight bytes and a QAT memory estimate from shapes alone (jax.eval_shape)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta

from moeqjax.model import ModelConfig, MoETransformer
from moeqjax.model.projection_codes import layer_codes
from moeqjax.quant import weight_bytes
from moeqjax.quant.clip import is_clip_param

_GIB = 2**30


def _group(path: tuple[str, ...]) -> str:
  if path[0] in ("embedding", "lm_head"):
    return "embed"
  if "shared_expert" in path:
    return "shared"
  if "router" in path:
    return "router"
  if path[-1] in ("w_in", "w_gate", "w_out") or is_clip_param(path[-1]):
    return "experts"
  if "attn" in path and path[-1] in ("kernel", "bias"):
    return "attn"
  return "norm"


def _code(cfg: ModelConfig, path, group) -> int:
  rules = cfg.quant
  if group == "experts" and path[-1] in ("w_in", "w_gate", "w_out"):
    return rules.expert_code
  if path[-1] != "kernel":
    return 0
  return {"attn": rules.attn_code, "shared": rules.shared_code, "router": rules.router_code,
          "embed": rules.lm_head_code if path[0] == "lm_head" else 0}.get(group, 0)


def abstract_variables(cfg: ModelConfig):
  """The boxed variables (shapes, dtypes, logical axes) of a config; nothing is allocated.

  Cached: tracing a large model's init takes seconds, and `plan` asks more than once.
  """
  return _abstract_variables(cfg)


@functools.lru_cache(maxsize=8)
def _abstract_variables(cfg: ModelConfig):
  return jax.eval_shape(lambda: MoETransformer(cfg).init(jax.random.key(0),
                                                         jnp.zeros((1, 8), jnp.int32)))


def _abstract_params(cfg: ModelConfig):
  """The params tree as shapes and dtypes (jax.eval_shape; nothing is allocated)."""
  return meta.unbox(abstract_variables(cfg))["params"]


def plan(cfg: ModelConfig, batch_size: int, seq_len: int, expert_codes_LxE=None) -> dict:
  """Shapes-only memory plan of a model and its QAT run.

  Args:
    cfg: the model config (its quant rules give the codes of non-expert tensors).
    batch_size, seq_len: the QAT batch (for the activation estimate).
    expert_codes_LxE: per-expert codes [L, E] or [L, 3, E]; None uses quant.expert_code everywhere.

  Returns:
    dict of counts (params by group, active per token) and bytes (fp, quantized, QAT estimate).
  """
  params = _abstract_params(cfg)
  spec = cfg.quant.spec()
  counts = {g: 0 for g in ("embed", "attn", "router", "experts", "shared", "norm")}
  fp_bytes = 0
  q_bytes = 0
  codes = (np.full((cfg.num_layers, cfg.num_experts), cfg.quant.expert_code)
           if expert_codes_LxE is None else np.asarray(expert_codes_LxE))
  cache: dict = {}

  def wbytes(shape, code):
    key = (tuple(shape), int(code))
    if key not in cache:
      cache[key] = weight_bytes(shape, int(code), spec)
    return cache[key]

  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = tuple(k.key for k in kp)
    group = _group(path)
    n = math.prod(leaf.shape)
    counts[group] += n
    fp_bytes += n * np.dtype(leaf.dtype).itemsize
    if group == "experts" and path[-1] in ("w_in", "w_gate", "w_out"):
      layer = int(path[0].split("_")[1])
      q_bytes += sum(wbytes(leaf.shape[1:], c) for c in layer_codes(codes[layer], path[-1]))
    elif is_clip_param(path[-1]):
      pass  # learned clip ratios are folded into the stored scales: no bytes of their own
    elif len(leaf.shape) == 2 and path[-1] == "kernel":
      q_bytes += wbytes(leaf.shape, _code(cfg, path, group))
    else:
      q_bytes += 2 * n  # embeddings, norms, biases stay bf16
  total = sum(counts.values())
  active = total - counts["experts"] + counts["experts"] * cfg.top_k // cfg.num_experts
  itemsize = np.dtype(cfg.param_dtype).itemsize
  # QAT holds the frozen teacher, the student, its gradient and two Adam moments (param dtype).
  weights_state = total * itemsize * 5
  # Activations kept for the backward pass, per layer and token (rough: residual stream, norms,
  # q/k/v/o, attention probabilities, the k routed experts' SwiGLU hidden states, plus the
  # teacher's forward which is not saved), in float32.
  per_token_layer = (10 * cfg.d_model + 2 * cfg.num_heads * cfg.head_dim
                     + 3 * cfg.top_k * cfg.d_ff + 3 * cfg.shared_d_ff + 2 * cfg.num_experts)
  attn_probs = cfg.num_heads * seq_len  # per token per layer
  activations = batch_size * seq_len * cfg.num_layers * (per_token_layer + attn_probs) * 4
  logits = batch_size * seq_len * cfg.vocab_size * 4 * 4  # student + teacher logits and grads
  return {
      "params": counts, "params_total": total, "params_active_per_token": active,
      "fp_bytes": fp_bytes, "bf16_bytes": total * 2, "quantized_bytes": q_bytes,
      "qat_weights_state_bytes": weights_state, "qat_activation_bytes": activations + logits,
      "qat_total_bytes": weights_state + activations + logits,
      "batch_size": batch_size, "seq_len": seq_len,
  }


def format_plan(cfg: ModelConfig, p: dict) -> str:
  def n(x):
    return f"{x / 1e9:.3f} B" if x >= 1e8 else f"{x / 1e6:.3f} M"

  def b(x):
    return f"{x / _GIB:.2f} GiB"

  lines = ["parameters:"]
  for g, c in p["params"].items():
    lines.append(f"  {g:10s} {n(c):>14s}")
  lines += [
      f"  {'total':10s} {n(p['params_total']):>14s}",
      f"  {'active/tok':10s} {n(p['params_active_per_token']):>14s}  (top_k={cfg.top_k} of "
      f"{cfg.num_experts} experts)",
      "weight bytes:",
      f"  {cfg.param_dtype:22s} {b(p['fp_bytes']):>12s}",
  ] + ([f"  {'bfloat16':22s} {b(p['bf16_bytes']):>12s}"] if cfg.param_dtype != "bfloat16" else []) + [
      f"  {'quantized (expert code ' + str(cfg.quant.expert_code) + ')':22s} "
      f"{b(p['quantized_bytes']):>12s}  ({p['bf16_bytes'] / p['quantized_bytes']:.1f}x vs bf16)",
      f"estimated accelerator memory for QAT (batch {p['batch_size']} x {p['seq_len']}):",
      f"  {'teacher+student+grad+Adam':26s} {b(p['qat_weights_state_bytes']):>12s}",
      f"  {'activations (rough, no remat)':26s} {b(p['qat_activation_bytes']):>12s}",
      f"  {'total':26s} {b(p['qat_total_bytes']):>12s}  (before sharding over devices)",
  ]
  return "\n".join(lines)
