"""Shared helpers for the HF conversion tests: tiny random HF MoE models built offline."""

import numpy as np
import pytest

VOCAB = 61


def hf_config(family: str, num_experts: int, top_k: int, norm_topk_prob: bool, **extra):
  """A tiny transformers config of `family` (no downloads)."""
  transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")
  common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, num_experts_per_tok=top_k,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
  if family == "mixtral":
    assert norm_topk_prob, "Mixtral always renormalises"
    cfg = transformers.MixtralConfig(num_local_experts=num_experts, intermediate_size=24,
                                     rope_theta=1e6, **common, **extra)
  elif family == "qwen2_moe":
    cfg = transformers.Qwen2MoeConfig(num_experts=num_experts, moe_intermediate_size=24,
                                      intermediate_size=40, shared_expert_intermediate_size=40,
                                      norm_topk_prob=norm_topk_prob, **common, **extra)
  elif family == "qwen3_moe":
    cfg = transformers.Qwen3MoeConfig(num_experts=num_experts, moe_intermediate_size=24,
                                      head_dim=12, norm_topk_prob=norm_topk_prob, **common,
                                      **extra)
  elif family == "olmoe":
    cfg = transformers.OlmoeConfig(num_experts=num_experts, intermediate_size=24,
                                   norm_topk_prob=norm_topk_prob, **common, **extra)
  else:
    raise ValueError(family)
  return cfg


def build_hf_model(family, num_experts, top_k, norm_topk_prob, seed=0, **extra):
  """A random float32 HF model with O(1) weights, so logits and routing are far from trivial."""
  torch = pytest.importorskip("torch", reason="HF parity tests need torch")
  transformers = pytest.importorskip("transformers", reason="HF parity tests need transformers")
  cfg = hf_config(family, num_experts, top_k, norm_topk_prob, **extra)
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
      else:
        fan_in = p.shape[-1]
        p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5))
  return model.float().eval()


def save_hf_model(model, path, **kwargs):
  model.save_pretrained(path, **kwargs)
  return path


def hf_logits_and_routing(model, tokens_BxS):
  """(logits [B, S, V] numpy, expert ids per layer [L, B*S, K] sorted) from the torch model."""
  import torch
  with torch.no_grad():
    out = model(torch.as_tensor(tokens_BxS), output_router_logits=True)
  k = model.config.num_experts_per_tok
  idx = []
  for rl in out.router_logits:
    probs = torch.softmax(rl.float(), dim=-1)
    idx.append(torch.topk(probs, k, dim=-1).indices.numpy())
  return out.logits.float().numpy(), np.sort(np.stack(idx), axis=-1)


def tokens(batch, seq, seed=0):
  return np.random.RandomState(seed).randint(3, VOCAB, (batch, seq)).astype(np.int32)
