"""Which llama.cpp architecture holds a ModelConfig, its GGUF keys, and the map from our params to GGUF tensors."""

from __future__ import annotations

import dataclasses

from moeqjax.convert.errors import ConvertError
from moeqjax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Arch:
  """What llama.cpp fixes for one architecture (src/models/<arch>.cpp).

  name: general.architecture.
  permute_qk: its rope rotates adjacent pairs (LLAMA_ROPE_TYPE_NORM), so our half-split (NeoX/HF)
    Q/K rows are permuted as llama.cpp's HF converter does for Mixtral.
  norm_topk_prob: whether its MoE renormalises the top-k gates (`norm_w` in build_moe_ffn).
  output_required: it has no tied-embedding fallback, so `output.weight` is always written.
  """

  name: str
  permute_qk: bool
  norm_topk_prob: bool
  output_required: bool


LLAMA = Arch("llama", True, True, False)  # Mixtral is arch llama with experts
QWEN2MOE = Arch("qwen2moe", False, False, True)
QWEN3MOE = Arch("qwen3moe", False, True, False)
OLMOE = Arch("olmoe", False, False, True)


def _refuse(field: str, value, arch: str, why: str):
  raise ConvertError(f"model.{field}={value!r} cannot be exported to GGUF: llama.cpp arch {arch} "
                     f"{why}")


def arch_for(cfg: ModelConfig) -> Arch:
  """The llama.cpp architecture whose graph computes our model, chosen by config fields.

  Raises:
    ConvertError: one line naming the field that no architecture (or the matching one) holds.
  """
  if cfg.quant.act_bits:
    _refuse("quant.act_bits", cfg.quant.act_bits, "(any)", "rounds activations its own way "
            "(per 32-block, not per token); export a weight-only student")
  if cfg.qk_norm == "head":
    arch = QWEN3MOE
  elif cfg.qk_norm == "full":
    arch = OLMOE
  elif cfg.shared_d_ff:
    arch = QWEN2MOE
  else:
    arch = LLAMA
  if cfg.shared_d_ff and arch is not QWEN2MOE:
    _refuse("shared_d_ff", cfg.shared_d_ff, arch.name, "has no shared expert (only qwen2moe, "
            "whose q/k are not normed)")
  if arch is QWEN2MOE and not cfg.shared_expert_gate:
    _refuse("shared_expert_gate", False, arch.name, "always gates its shared expert")
  if cfg.clip_qkv:
    _refuse("clip_qkv", cfg.clip_qkv, arch.name, "does not clamp q/k/v")
  if cfg.attn_out_bias and arch is not LLAMA:
    _refuse("attn_out_bias", True, arch.name, "has no attention output bias")
  if arch in (QWEN2MOE, OLMOE) and cfg.num_heads * cfg.head_dim != cfg.d_model:
    _refuse("head_dim", cfg.head_dim, arch.name, "needs num_heads * head_dim == d_model")
  if arch is OLMOE and cfg.num_kv_heads != cfg.num_heads:
    _refuse("num_kv_heads", cfg.num_kv_heads, arch.name, "norms k over d_model, so it needs "
            "num_kv_heads == num_heads")
  if cfg.norm_topk_prob != arch.norm_topk_prob:
    _refuse("norm_topk_prob", cfg.norm_topk_prob, arch.name,
            f"fixes it to {arch.norm_topk_prob} (it is not a GGUF key)")
  return arch


def add_hparams(writer, cfg: ModelConfig, arch: Arch, name: str):
  """Writes the architecture's hyperparameter keys (the vocabulary is written separately)."""
  writer.add_name(name)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_block_count(cfg.num_layers)
  writer.add_feed_forward_length(cfg.d_ff)  # llama and olmoe size their experts by this key
  if arch in (QWEN2MOE, QWEN3MOE):
    writer.add_expert_feed_forward_length(cfg.d_ff)
  if arch is QWEN2MOE:
    writer.add_expert_shared_feed_forward_length(cfg.shared_d_ff)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_key_length(cfg.head_dim)
  writer.add_value_length(cfg.head_dim)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(float(cfg.rope_theta))
  writer.add_layer_norm_rms_eps(float(cfg.norm_eps))
  writer.add_expert_count(cfg.num_experts)
  writer.add_expert_used_count(cfg.top_k)
  writer.add_vocab_size(cfg.vocab_size)


@dataclasses.dataclass(frozen=True)
class Tensor:
  """One GGUF tensor and where it comes from.

  name: the GGUF tensor name.
  path: our param path.
  kind: "embedding" (stored as is, [V, D]), "vector" (norm scale or bias, as is), "kernel"
    ([in, out] -> [out, in]), "experts" ([E, in, out] -> [E, out, in]) or "gate_vector" (the [D, 1]
    shared-expert gate kernel, stored as a vector [D]).
  codes: path of its bit codes in the `quant` collection (absent codes: full precision).
  permute_heads: llama's Q/K row permutation over this many heads (0: none).
  clip: the param path of its learned clip ratio (experts with quant.learn_clip), else None.
  """

  name: str
  path: tuple
  kind: str
  codes: tuple | None = None
  permute_heads: int = 0
  clip: tuple | None = None


def tensors(cfg: ModelConfig, arch: Arch) -> list[Tensor]:
  """Every GGUF tensor of `cfg` under `arch`, layer by layer."""
  out = [Tensor("token_embd.weight", ("embedding",), "embedding")]
  for i in range(cfg.num_layers):
    us, b = (f"layers_{i}",), f"blk.{i}"
    at, moe = us + ("attn",), us + ("moe",)
    out.append(Tensor(f"{b}.attn_norm.weight", us + ("attn_norm", "scale"), "vector"))
    for proj, gg, heads in (("q_proj", "attn_q", cfg.num_heads), ("k_proj", "attn_k",
                                                                  cfg.num_kv_heads),
                            ("v_proj", "attn_v", 0), ("o_proj", "attn_output", 0)):
      perm = heads if arch.permute_qk else 0
      out.append(Tensor(f"{b}.{gg}.weight", at + (proj, "kernel"), "kernel", at + (proj, "bits"),
                        perm))
      if (cfg.attn_bias and proj != "o_proj") or (cfg.attn_out_bias and proj == "o_proj"):
        out.append(Tensor(f"{b}.{gg}.bias", at + (proj, "bias"), "vector", None, perm))
    if cfg.qk_norm != "none":
      out.append(Tensor(f"{b}.attn_q_norm.weight", at + ("q_norm", "scale"), "vector"))
      out.append(Tensor(f"{b}.attn_k_norm.weight", at + ("k_norm", "scale"), "vector"))
    out.append(Tensor(f"{b}.ffn_norm.weight", us + ("mlp_norm", "scale"), "vector"))
    out.append(Tensor(f"{b}.ffn_gate_inp.weight", moe + ("router", "kernel"), "kernel",
                      moe + ("router", "bits")))
    for ours, gg in (("w_gate", "ffn_gate_exps"), ("w_in", "ffn_up_exps"),
                     ("w_out", "ffn_down_exps")):
      clip = moe + (f"{ours}_clip",) if cfg.quant.has_ratio else None
      out.append(Tensor(f"{b}.{gg}.weight", moe + (ours,), "experts", moe + ("expert_bits",),
                        0, clip))
    if cfg.shared_d_ff:
      sh = moe + ("shared_expert",)
      for ours, gg in (("gate_proj", "ffn_gate_shexp"), ("up_proj", "ffn_up_shexp"),
                       ("down_proj", "ffn_down_shexp")):
        out.append(Tensor(f"{b}.{gg}.weight", sh + (ours, "kernel"), "kernel",
                          sh + (ours, "bits")))
      out.append(Tensor(f"{b}.ffn_gate_inp_shexp.weight", sh + ("gate", "kernel"),
                        "gate_vector"))
  out.append(Tensor("output_norm.weight", ("final_norm", "scale"), "vector"))
  if not cfg.tie_embeddings:
    out.append(Tensor("output.weight", ("lm_head", "kernel"), "kernel", ("lm_head", "bits")))
  elif arch.output_required:
    out.append(Tensor("output.weight", ("embedding",), "embedding"))
  return out
