"""Shared helpers for the compressed-tensors tests: tiny students of each HF family, loaded back by transformers."""

import numpy as np
import pytest

from moeqjax.convert import runtimes
from moeqjax.model import QuantRules

from gguf_models import gguf_cfg, student

# Config fields that make our model one of the four HF family layouts (d = f = 64: group 32 fits).
FAMILIES = {
    "mixtral": {},
    "qwen2_moe": dict(shared_d_ff=64, shared_expert_gate=True, attn_bias=True,
                      norm_topk_prob=False),
    "qwen3_moe": dict(qk_norm="head"),
    "olmoe": dict(qk_norm="full", num_kv_heads=4, norm_topk_prob=False),
}


def ct_student(family, codes_LxE, seed=0, **rules):
  """(cfg, params, quant) of a 2-layer d=64 student in `family`'s layout, experts at `codes_LxE`."""
  base = dict(expert_code=4, granularity="channel")
  base.update(rules)
  cfg = gguf_cfg(d=64, f=64, quant=QuantRules(**base), **FAMILIES[family])
  params, quant = student(cfg, codes_LxE, seed)
  # gguf_models scales the embedding 50x and the lm_head 3x for peaked logits; at init scale the
  # logits are O(1), where float32 summation order in two frameworks stays below 1e-5 (the
  # export's own exactness is checked weight by weight, and against a float32 HF export).
  params["embedding"] = np.asarray(params["embedding"]) / 50.0
  if "lm_head" in params:
    params["lm_head"]["kernel"] = np.asarray(params["lm_head"]["kernel"]) / 3.0
  return cfg, params, quant


def load_ct(path):
  """The exported folder loaded by transformers + compressed-tensors, dequantized on CPU (float32)."""
  pytest.importorskip("transformers")
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra (compressed-tensors)")
  return runtimes.load_compressed_tensors(path)


logits = runtimes.torch_logits


def tokens(batch=2, seq=12, seed=0):
  return np.random.RandomState(seed).randint(0, 256, (batch, seq)).astype(np.int32)
