"""The tensor-by-tensor map between Hugging Face Switch Transformers names and our SwitchTransformer params."""

from __future__ import annotations

from moeqjax.convert.layout import Entry
from moeqjax.model import SwitchConfig

STACKS = (("encoder", "num_layers"), ("decoder", "num_decoder_layers"))
# HF's untied model still holds `shared.weight`, which its forward pass never reads: an import
# ignores it and an export writes the encoder's input embedding there (set_input_embeddings').
UNTIED_SHARED = ("shared.weight", ("encoder_embedding",))
# Copies of the one tied matrix that some tied checkpoints store next to shared.weight.
TIED_COPIES = ("lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def switch_entries(cfg: SwitchConfig) -> list[Entry]:
  """Every tensor of the HF checkpoint of `cfg`, in our param order (HF stores experts singly)."""
  d, v, f, e = cfg.d_model, cfg.vocab_size, cfg.d_ff, cfg.num_experts
  inner = cfg.num_heads * cfg.d_kv
  out = []

  def linear(path, name, n_in, n_out, bias=False):
    out.append(Entry(path + ("kernel",), None, name + ".weight", (n_out, n_in), True))
    if bias:
      out.append(Entry(path + ("bias",), None, name + ".bias", (n_out,), False))

  def norm(path, name):
    out.append(Entry(path + ("scale",), None, name + ".weight", (d,), False))

  def attention(path, name):
    for proj in ("q", "k", "v"):
      linear(path + (f"{proj}_proj",), f"{name}.{proj}", d, inner)
    linear(path + ("o_proj",), f"{name}.o", inner, d)

  if cfg.tie_embeddings:
    out.append(Entry(("embedding",), None, "shared.weight", (v, d), False))
  else:
    out.append(Entry(("encoder_embedding",), None, "encoder.embed_tokens.weight", (v, d), False))
    out.append(Entry(("decoder_embedding",), None, "decoder.embed_tokens.weight", (v, d), False))
  for stack, layers_key in STACKS:
    is_decoder = stack == "decoder"
    sparse = cfg.decoder_sparse_layers if is_decoder else cfg.encoder_sparse_layers
    out.append(Entry((stack, "relative_position_bias", "embedding"), None,
                     f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     (cfg.relative_attention_num_buckets, cfg.num_heads), False))
    for i in range(getattr(cfg, layers_key)):
      hf, us = f"{stack}.block.{i}.layer", (stack, f"layers_{i}")
      norm(us + ("self_attn_norm",), f"{hf}.0.layer_norm")
      attention(us + ("self_attn",), f"{hf}.0.SelfAttention")
      if is_decoder:
        norm(us + ("cross_attn_norm",), f"{hf}.1.layer_norm")
        attention(us + ("cross_attn",), f"{hf}.1.EncDecAttention")
      ff = f"{hf}.{2 if is_decoder else 1}"
      norm(us + ("mlp_norm",), f"{ff}.layer_norm")
      if i in sparse:
        moe = us + ("moe",)
        linear(moe + ("router",), f"{ff}.mlp.router.classifier", d, e, cfg.router_bias)
        for ours, theirs, shape in (("w_in", "wi", (f, d)), ("w_out", "wo", (d, f))):
          for j in range(e):
            out.append(Entry(moe + (ours,), j, f"{ff}.mlp.experts.expert_{j}.{theirs}.weight",
                             shape, True))
      else:
        linear(us + ("dense_mlp", "wi"), f"{ff}.mlp.wi", d, f)
        linear(us + ("dense_mlp", "wo"), f"{ff}.mlp.wo", f, d)
    norm((stack, "final_norm"), f"{stack}.final_layer_norm")
  if not cfg.tie_embeddings:
    linear(("lm_head",), "lm_head", d, v)
  return out
