"""Hugging Face switch_transformers config.json <-> SwitchConfig."""

from __future__ import annotations

from moeqjax.convert.errors import ConvertError
from moeqjax.model import QuantRules, SwitchConfig

MODEL_TYPE = "switch_transformers"
ARCHITECTURE = "SwitchTransformersForConditionalGeneration"

# Keys that do not change the inference forward pass of transformers' Switch (metadata, training
# knobs, generation ids), including older checkpoints' keys that transformers' Switch never reads
# (router_type, batch_prioritized_routing, num_selected_experts, feed_forward_proj, is_gated_act)
# and the sparse steps it recomputes from num_sparse_*_layers.
_METADATA_KEYS = {
    "architectures", "model_type", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
    "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "dropout_rate", "initializer_factor", "router_z_loss_coef", "router_aux_loss_coef",
    "router_ignore_padding_tokens", "add_router_probs", "output_router_logits",
    "encoder_sparse_step", "decoder_sparse_step", "router_type", "batch_prioritized_routing",
    "num_selected_experts", "feed_forward_proj", "is_gated_act", "return_dict",
    "output_attentions", "output_hidden_states", "torchscript", "use_bfloat16",
    "chunk_size_feed_forward", "tokenizer_class", "task_specific_params", "id2label", "label2id",
    "problem_type", "pruned_heads", "tf_legacy_loss", "_commit_hash", "_attn_implementation",
    "_attn_implementation_autoset",
}
_MATH_KEYS = {
    "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
    "num_sparse_encoder_layers", "num_sparse_decoder_layers", "num_experts", "expert_capacity",
    "router_bias", "router_jitter_noise", "router_dtype", "relative_attention_num_buckets",
    "relative_attention_max_distance", "layer_norm_epsilon", "tie_word_embeddings",
    "dense_act_fn", "decoder_start_token_id",
}
# transformers' SwitchTransformersConfig defaults, for keys a config.json leaves out.
_DEFAULTS = {
    "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048, "expert_capacity": 64,
    "num_layers": 12, "num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 3,
    "num_heads": 12, "num_experts": 8, "router_bias": False, "router_jitter_noise": 0.01,
    "router_dtype": "float32", "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "dense_act_fn": "relu",
    "tie_word_embeddings": True, "pad_token_id": 0,
}


def is_switch(config_json: dict) -> bool:
  return config_json.get("model_type") == MODEL_TYPE


def hf_config_to_switch_config(config_json: dict, dtype: str = "float32", *,
                               allow_unknown: bool = False,
                               quant: QuantRules | None = None) -> SwitchConfig:
  """Maps a switch_transformers config.json (as a dict) to our SwitchConfig.

  Args:
    config_json: the parsed config.json.
    dtype: "float32" or "bfloat16"; both the activation and the parameter dtype.
    allow_unknown: accept config keys this converter does not know (they are then ignored).
    quant: quantization rules for the new config (default QuantRules()).

  Raises:
    ConvertError: another model_type, a dense activation other than relu, a router dtype other
      than float32, an expert capacity of 0, sparse layers that do not fit, or unknown keys.
  """
  cfg = {**_DEFAULTS, **{k: v for k, v in config_json.items() if v is not None}}
  if not is_switch(cfg):
    raise ConvertError(f"config.json model_type={cfg.get('model_type')!r} is not "
                       f"{MODEL_TYPE!r}")
  unknown = sorted(set(cfg) - _METADATA_KEYS - _MATH_KEYS)
  if unknown and not allow_unknown:
    raise ConvertError(
        f"config.json has field(s) moeqjax does not understand: {', '.join(unknown)}; they may "
        "change the model's math, so the import stops (pass allow_unknown=True to ignore them)")
  if cfg["dense_act_fn"] != "relu":
    raise ConvertError(f"config.json field 'dense_act_fn' = {cfg['dense_act_fn']!r}; moeqjax "
                       "implements the original Switch's relu FFNs only")
  if cfg["router_dtype"] != "float32":
    raise ConvertError(f"config.json field 'router_dtype' = {cfg['router_dtype']!r}; moeqjax "
                       "routes in float32 only")
  if int(cfg["expert_capacity"]) < 1:
    raise ConvertError(f"config.json field 'expert_capacity' = {cfg['expert_capacity']} drops "
                       "every token in transformers; it must be at least 1")
  try:
    return SwitchConfig(
        vocab_size=int(cfg["vocab_size"]), d_model=int(cfg["d_model"]), d_kv=int(cfg["d_kv"]),
        num_heads=int(cfg["num_heads"]), d_ff=int(cfg["d_ff"]), num_layers=int(cfg["num_layers"]),
        num_decoder_layers=int(cfg.get("num_decoder_layers", cfg["num_layers"])),
        num_sparse_encoder_layers=int(cfg["num_sparse_encoder_layers"]),
        num_sparse_decoder_layers=int(cfg["num_sparse_decoder_layers"]),
        num_experts=int(cfg["num_experts"]), expert_capacity=int(cfg["expert_capacity"]),
        router_bias=bool(cfg["router_bias"]), router_jitter=float(cfg["router_jitter_noise"]),
        relative_attention_num_buckets=int(cfg["relative_attention_num_buckets"]),
        relative_attention_max_distance=int(cfg["relative_attention_max_distance"]),
        norm_eps=float(cfg["layer_norm_epsilon"]),
        tie_embeddings=bool(cfg["tie_word_embeddings"]),
        decoder_start_token_id=int(cfg.get("decoder_start_token_id", cfg["pad_token_id"])),
        dispatch="ragged", dtype=dtype, param_dtype=dtype, quant=quant or QuantRules())
  except ValueError as e:
    raise ConvertError(f"config.json describes a Switch Transformer moeqjax cannot build: "
                       f"{e}") from None


def switch_config_to_hf_config(cfg: SwitchConfig, template: dict | None = None,
                               dtype: str = "float32") -> dict:
  """The switch_transformers config.json of a model with our config.

  Args:
    cfg: our config.
    template: the original config.json; its other keys (token ids, loss coefficients) are kept.
    dtype: the dtype of the weights written next to it.

  Raises:
    ConvertError: int8 activations, which transformers' Switch cannot express.
  """
  if cfg.quant.act_bits:
    raise ConvertError("quant.act_bits=8 (int8 activations) has no Hugging Face equivalent; "
                       "export a weight-only model")
  out = dict(template or {})
  out.update({
      "model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], "vocab_size": cfg.vocab_size,
      "d_model": cfg.d_model, "d_kv": cfg.d_kv, "num_heads": cfg.num_heads, "d_ff": cfg.d_ff,
      "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers,
      "num_sparse_encoder_layers": cfg.num_sparse_encoder_layers,
      "num_sparse_decoder_layers": cfg.num_sparse_decoder_layers,
      "num_experts": cfg.num_experts,
      # transformers always applies a capacity; ours of 0 (none) is one no sequence reaches
      "expert_capacity": cfg.expert_capacity or 2**31 - 1,
      "router_bias": cfg.router_bias, "router_jitter_noise": cfg.router_jitter,
      "router_dtype": "float32",
      "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
      "relative_attention_max_distance": cfg.relative_attention_max_distance,
      "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
      "dense_act_fn": "relu", "decoder_start_token_id": cfg.decoder_start_token_id,
      "is_encoder_decoder": True,
      "torch_dtype" if "torch_dtype" in out else "dtype": dtype,
  })
  # transformers recomputes these from num_sparse_*_layers; stale copies would only mislead.
  out.pop("encoder_sparse_step", None)
  out.pop("decoder_sparse_step", None)
  return out
