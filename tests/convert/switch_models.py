"""Tiny random Hugging Face Switch Transformers models for the parity tests, built offline."""

import numpy as np
import pytest

VOCAB = 53
START = 0  # decoder_start_token_id (= pad, as in the released checkpoints)


def build_switch_model(seed=0, **config):
  """A random float32 SwitchTransformersForConditionalGeneration with O(1) weights, in eval mode."""
  torch = pytest.importorskip("torch", reason="Switch parity tests need torch")
  transformers = pytest.importorskip("transformers", reason="Switch parity tests need transformers")
  base = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=24, num_heads=2, num_layers=2,
              num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=4, expert_capacity=64, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, decoder_start_token_id=START, pad_token_id=0,
              eos_token_id=1)
  base.update(config)
  cfg = transformers.SwitchTransformersConfig(**base)
  torch.manual_seed(seed)
  model = transformers.SwitchTransformersForConditionalGeneration(cfg)
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias") or "relative_attention_bias" in name:
        p.copy_(torch.randn(p.shape, generator=gen))
      else:
        p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / p.shape[-1] ** 0.5))
  return model.float().eval()


def tokens(batch, seq, seed=0):
  return np.random.RandomState(seed).randint(2, VOCAB, (batch, seq)).astype(np.int32)


def hf_forward(model, encoder_ids, decoder_ids, encoder_mask=None):
  """The torch model's output with router logits (logits, per-layer router logits, losses)."""
  import torch
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(encoder_ids, dtype=torch.long),
                 decoder_input_ids=torch.as_tensor(decoder_ids, dtype=torch.long),
                 attention_mask=None if encoder_mask is None else torch.as_tensor(encoder_mask),
                 output_router_logits=True)
