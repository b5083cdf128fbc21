"""Shared helpers for the GGUF tests: tiny students whose rows fit ggml's blocks, and a GGUF reader."""

import jax
import numpy as np
import pytest

from moeqjax.model import ModelConfig, QuantRules, init_model


def gguf_cfg(d=256, f=256, **changes) -> ModelConfig:
  """A 2-layer byte-level student; d and f are row lengths, so multiples of 256 admit TQ2_0."""
  quant = changes.pop("quant", QuantRules(expert_code=1, granularity="channel"))
  base = dict(vocab_size=256, d_model=d, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=d // 4, d_ff=f, num_experts=4, top_k=2, max_seq_len=64, quant=quant)
  base.update(changes)
  return ModelConfig(**base)


def student(cfg: ModelConfig, codes_LxE=None, seed=0):
  """(params, quant) with O(1) weights so that logits are peaked and routing is decisive."""
  _, params, quant = init_model(cfg, jax.random.key(seed))
  rng = np.random.default_rng(seed)

  def scale(path, x):
    name = jax.tree_util.keystr(path)
    if "scale" in name:  # norms around 1, not exactly 1, so a swapped norm shows
      return np.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), np.float32)
    if "embedding" in name:
      return np.asarray(x, np.float32) * 50.0
    if "lm_head" in name:
      return np.asarray(x, np.float32) * 3.0
    if "router" in name:
      return np.asarray(x, np.float32) * 4.0
    if "bias" in name:
      return np.asarray(0.1 * rng.standard_normal(x.shape), np.float32)
    return np.asarray(x, np.float32) * 1.5
  params = jax.tree_util.tree_map_with_path(scale, params)
  if codes_LxE is not None:
    for i, codes in enumerate(codes_LxE):
      quant[f"layers_{i}"]["moe"]["expert_bits"] = np.asarray(codes, np.int32)
  return params, quant


def read_gguf(path):
  """{name: (ggml type name, dequantized float32 array in numpy [..., out, in])}, and the reader."""
  gguf = pytest.importorskip("gguf")
  reader = gguf.GGUFReader(str(path))
  out = {}
  for t in reader.tensors:
    out[t.name] = (t.tensor_type.name, gguf.quants.dequantize(t.data, t.tensor_type))
  return out, reader
