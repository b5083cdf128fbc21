"""The tensor-by-tensor map between a HF family's safetensors names and our param tree."""

from __future__ import annotations

import dataclasses

from moeqjax.convert.hf_config import Family
from moeqjax.model import ModelConfig

# HF nn.Linear stores weight [out, in]; our kernels are [in, out], so most tensors transpose.


@dataclasses.dataclass(frozen=True)
class Entry:
  """One HF tensor and where it goes.

  path: our param path, e.g. ("layers_0", "attn", "q_proj", "kernel").
  expert: index into the leading [E] axis of a stacked expert param, or None.
  hf_name: the safetensors tensor name.
  hf_shape: its shape in the checkpoint.
  transpose: whether our array (or expert slice) is its transpose.
  """

  path: tuple[str, ...]
  expert: int | None
  hf_name: str
  hf_shape: tuple[int, ...]
  transpose: bool


def entries(cfg: ModelConfig, fam: Family) -> list[Entry]:
  """Every tensor of the HF checkpoint of `cfg`, in our param order (layer by layer)."""
  d, a = cfg.d_model, cfg.head_dim
  hq, hkv = cfg.num_heads * a, cfg.num_kv_heads * a
  out = [Entry(("embedding",), None, "model.embed_tokens.weight", (cfg.vocab_size, d), False)]

  def linear(path, name, n_in, n_out, bias=False):
    out.append(Entry(path + ("kernel",), None, name + ".weight", (n_out, n_in), True))
    if bias:
      out.append(Entry(path + ("bias",), None, name + ".bias", (n_out,), False))

  def norm(path, name, n):
    out.append(Entry(path + ("scale",), None, name + ".weight", (n,), False))

  for i in range(cfg.num_layers):
    hf, us = f"model.layers.{i}", (f"layers_{i}",)
    norm(us + ("attn_norm",), f"{hf}.input_layernorm", d)
    for proj, n_out in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv)):
      linear(us + ("attn", proj), f"{hf}.self_attn.{proj}", d, n_out, cfg.attn_bias)
    linear(us + ("attn", "o_proj"), f"{hf}.self_attn.o_proj", hq, d, cfg.attn_out_bias)
    if cfg.qk_norm == "full":
      norm(us + ("attn", "q_norm"), f"{hf}.self_attn.q_norm", hq)
      norm(us + ("attn", "k_norm"), f"{hf}.self_attn.k_norm", hkv)
    elif cfg.qk_norm == "head":
      norm(us + ("attn", "q_norm"), f"{hf}.self_attn.q_norm", a)
      norm(us + ("attn", "k_norm"), f"{hf}.self_attn.k_norm", a)
    norm(us + ("mlp_norm",), f"{hf}.post_attention_layernorm", d)
    moe, mus = f"{hf}.{fam.moe_prefix}", us + ("moe",)
    linear(mus + ("router",), f"{moe}.gate", d, cfg.num_experts)
    gate, up, down = fam.expert_names
    for ours, theirs, shape in (("w_gate", gate, (cfg.d_ff, d)), ("w_in", up, (cfg.d_ff, d)),
                                ("w_out", down, (d, cfg.d_ff))):
      for e in range(cfg.num_experts):
        out.append(Entry(mus + (ours,), e, f"{moe}.experts.{e}.{theirs}.weight", shape, True))
    if cfg.shared_d_ff:
      s = mus + ("shared_expert",)
      linear(s + ("gate_proj",), f"{moe}.shared_expert.gate_proj", d, cfg.shared_d_ff)
      linear(s + ("up_proj",), f"{moe}.shared_expert.up_proj", d, cfg.shared_d_ff)
      linear(s + ("down_proj",), f"{moe}.shared_expert.down_proj", cfg.shared_d_ff, d)
      if cfg.shared_expert_gate:
        linear(s + ("gate",), f"{moe}.shared_expert_gate", d, 1)
  norm(("final_norm",), "model.norm", d)
  if not cfg.tie_embeddings:
    linear(("lm_head",), "lm_head", d, cfg.vocab_size)
  return out


# Tensors a checkpoint may hold that carry no weights of the model (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
