"""Tiny quantized Switch students (d_model 16, 4 experts) shared by the pack, export and eval tests."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.model import QuantRules, SwitchConfig, default_quant, set_expert_codes
from moeqjax.model.switch import SwitchTransformer

VOCAB = 40
# Rows: the encoder's sparse layer, then the decoder's (moe_paths order); every code, mixed.
MIXED = [[1, 2, 4, 3], [8, 1, 3, 2]]


def switch_cfg(rules: QuantRules | None = None, **changes) -> SwitchConfig:
  """One sparse layer in each stack (encoder layer 1 dense when num_layers=2)."""
  base = dict(vocab_size=VOCAB, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=1,
              num_decoder_layers=1, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
              quant=rules or QuantRules(expert_code=1))
  base.update(changes)
  return SwitchConfig(**base)


def switch_student(cfg: SwitchConfig, codes=MIXED, seed=0):
  """(params, quant) of a random student (init jitted: eager init is slow on 2 cores)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  variables = jax.jit(SwitchTransformer(cfg).init)(jax.random.key(seed), ids, ids)
  variables = jax.device_get(nn.meta.unbox(variables))
  return variables["params"], set_expert_codes(default_quant(cfg), codes)


def ids(batch, seq, seed=0):
  return np.random.default_rng(seed).integers(2, VOCAB, (batch, seq)).astype(np.int32)
