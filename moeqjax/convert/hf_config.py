"""Hugging Face config.json <-> ModelConfig for the Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE families."""

from __future__ import annotations

import dataclasses

from moeqjax.convert.errors import ConvertError
from moeqjax.model import ModelConfig, QuantRules


@dataclasses.dataclass(frozen=True)
class Family:
  """How one HF family names its MoE tensors (the layer math itself is in ModelConfig fields)."""

  model_type: str
  architecture: str
  moe_prefix: str  # the MoE block's module name inside a decoder layer
  expert_names: tuple[str, str, str]  # (gate, up, down) projection names of one expert
  experts_key: str  # config key holding the number of routed experts
  d_ff_key: str  # config key holding one expert's hidden size


FAMILIES = {
    "mixtral": Family("mixtral", "MixtralForCausalLM", "block_sparse_moe", ("w1", "w3", "w2"),
                      "num_local_experts", "intermediate_size"),
    "qwen2_moe": Family("qwen2_moe", "Qwen2MoeForCausalLM", "mlp",
                        ("gate_proj", "up_proj", "down_proj"), "num_experts",
                        "moe_intermediate_size"),
    "qwen3_moe": Family("qwen3_moe", "Qwen3MoeForCausalLM", "mlp",
                        ("gate_proj", "up_proj", "down_proj"), "num_experts",
                        "moe_intermediate_size"),
    "olmoe": Family("olmoe", "OlmoeForCausalLM", "mlp", ("gate_proj", "up_proj", "down_proj"),
                    "num_experts", "intermediate_size"),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)

# Keys that do not change the forward pass of a causal LM at inference (metadata, training-only
# knobs, generation ids), or that are checked explicitly below. Anything else is an error unless
# the caller passes allow_unknown=True: a field we do not understand may change the math.
_METADATA_KEYS = {
    "architectures", "model_type", "_name_or_path", "name_or_path", "torch_dtype", "dtype",
    "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
    "initializer_range", "output_router_logits", "router_aux_loss_coef", "router_jitter_noise",
    "attention_dropout", "tokenizer_class", "output_attentions", "output_hidden_states",
    "return_dict", "torchscript", "use_bfloat16", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "tie_encoder_decoder", "chunk_size_feed_forward", "problem_type",
    "id2label", "label2id", "task_specific_params", "pruned_heads", "tf_legacy_loss",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset", "max_window_layers",
    "intermediate_size",  # Qwen-MoE: the dense-MLP size, unused when every layer is sparse
}
_MATH_KEYS = {
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings",
    "rope_theta", "rope_scaling", "rope_parameters", "num_experts_per_tok", "num_local_experts",
    "num_experts", "norm_topk_prob", "moe_intermediate_size", "shared_expert_intermediate_size",
    "qkv_bias", "attention_bias", "clip_qkv", "sliding_window", "use_sliding_window",
    "layer_types", "decoder_sparse_step", "mlp_only_layers",
}


def _field(cfg: dict, key: str, default=None, required=False):
  if key not in cfg or cfg[key] is None:
    if required:
      raise ConvertError(f"config.json has no {key!r}, which a {cfg.get('model_type')} model needs")
    return default
  return cfg[key]


def _rope_theta(cfg: dict) -> float:
  params = cfg.get("rope_parameters")
  scaling = cfg.get("rope_scaling")
  if params:
    rope_type = params.get("rope_type", params.get("type", "default"))
    extra = set(params) - {"rope_theta", "rope_type", "type"}
    if rope_type != "default" or extra:
      raise ConvertError(
          f"config.json field 'rope_parameters' = {params} asks for rope_type={rope_type!r}"
          f"{' with ' + str(sorted(extra)) if extra else ''}; moeqjax implements only the default "
          "rotary embedding (rope_type='default', rope_theta)")
    if "rope_theta" in params:
      return float(params["rope_theta"])
  if scaling:
    raise ConvertError(f"config.json field 'rope_scaling' = {scaling} is not supported; moeqjax "
                       "implements only unscaled rotary embeddings (rope_scaling null)")
  return float(_field(cfg, "rope_theta", 10000.0))


def _check_attention_window(cfg: dict):
  window = cfg.get("sliding_window")
  max_pos = cfg.get("max_position_embeddings") or 0
  # Qwen2/3-MoE gate the window on use_sliding_window; Mixtral and Qwen3 apply any non-null window.
  uses_window = cfg.get("use_sliding_window", window is not None)
  if cfg.get("model_type") == "qwen3_moe" or cfg.get("model_type") == "mixtral":
    uses_window = window is not None
  if uses_window and window and window < max_pos:
    raise ConvertError(
        f"config.json field 'sliding_window' = {window} (< max_position_embeddings={max_pos}) "
        "enables sliding-window attention, which moeqjax does not implement")
  layer_types = cfg.get("layer_types") or []
  sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
  if sliding and cfg.get("use_sliding_window", False):
    raise ConvertError(f"config.json field 'layer_types' makes layers {sliding} "
                       f"{layer_types[sliding[0]]!r}; moeqjax implements full attention only")


def _check_all_sparse(cfg: dict, num_layers: int):
  dense = sorted(set(cfg.get("mlp_only_layers") or []))
  step = cfg.get("decoder_sparse_step") or 1
  if step != 1:
    dense = sorted(set(dense) | {i for i in range(num_layers) if (i + 1) % step})
  if dense:
    raise ConvertError(
        f"config.json fields 'mlp_only_layers'/'decoder_sparse_step' make layers {dense} dense "
        "MLPs; moeqjax models have an MoE block in every layer (decoder_sparse_step=1, "
        "mlp_only_layers=[])")


def family_of(cfg: dict) -> Family:
  model_type = cfg.get("model_type")
  if model_type == "switch_transformers":
    raise ConvertError("config.json model_type='switch_transformers' is an encoder-decoder: import "
                       "it with moeqjax.convert.from_hf_switch (Python API); the CLI phases and "
                       "decoder-only exports do not run Switch Transformers yet")
  if model_type not in FAMILIES:
    raise ConvertError(f"config.json model_type={model_type!r} is not supported; supported: "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)}")
  return FAMILIES[model_type]


def hf_config_to_model_config(config_json: dict, dtype: str = "float32", *,
                              allow_unknown: bool = False,
                              quant: QuantRules | None = None) -> ModelConfig:
  """Maps a HF config.json (as a dict) to our ModelConfig, refusing anything we cannot express.

  Args:
    config_json: the parsed config.json of a Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint.
    dtype: "float32" or "bfloat16"; both the activation and the parameter dtype.
    allow_unknown: accept config keys this converter does not know (they are then ignored).
    quant: quantization rules for the new config (default QuantRules()).

  Returns:
    The ModelConfig whose forward pass reproduces the HF model.

  Raises:
    ConvertError: unsupported model_type, activation, rope scaling, sliding window, dense MLP
      layers, or unknown config keys; the message names the field.
  """
  cfg = dict(config_json)
  fam = family_of(cfg)
  unknown = sorted(set(cfg) - _METADATA_KEYS - _MATH_KEYS)
  if unknown and not allow_unknown:
    raise ConvertError(
        f"config.json has field(s) moeqjax does not understand: {', '.join(unknown)}; they may "
        "change the model's math, so the import stops (pass allow_unknown=True / "
        "--allow-unknown-config to ignore them)")
  if "quantization_config" in cfg:
    raise ConvertError("config.json has 'quantization_config': this checkpoint is already "
                       "quantized; import the full-precision release instead")
  act = _field(cfg, "hidden_act", "silu")
  if act != "silu":
    raise ConvertError(f"config.json field 'hidden_act' = {act!r}; moeqjax experts are SwiGLU "
                       "with silu only")
  num_layers = int(_field(cfg, "num_hidden_layers", required=True))
  _check_attention_window(cfg)
  _check_all_sparse(cfg, num_layers)
  d_model = int(_field(cfg, "hidden_size", required=True))
  heads = int(_field(cfg, "num_attention_heads", required=True))
  kv_heads = int(_field(cfg, "num_key_value_heads", heads))
  head_dim = int(_field(cfg, "head_dim", d_model // heads))
  if fam.model_type == "olmoe":
    head_dim = d_model // heads  # OLMoE ignores head_dim; its k_norm size assumes hidden/heads
  num_experts = _field(cfg, fam.experts_key)
  if num_experts is None:  # transformers 5 writes num_local_experts for Qwen3-MoE, older num_experts
    num_experts = _field(cfg, "num_local_experts" if fam.experts_key == "num_experts"
                         else "num_experts", required=True)
  shared_d_ff = 0
  if fam.model_type == "qwen2_moe":
    shared_d_ff = int(_field(cfg, "shared_expert_intermediate_size", 0))
  attn_bias = out_bias = False
  if fam.model_type == "qwen2_moe":
    attn_bias = bool(_field(cfg, "qkv_bias", True))  # Qwen2-MoE always had q/k/v biases
  elif fam.model_type in ("qwen3_moe", "olmoe"):
    attn_bias = out_bias = bool(_field(cfg, "attention_bias", False))
  elif cfg.get("attention_bias"):
    raise ConvertError("config.json field 'attention_bias' = true is not part of the Mixtral "
                       "architecture moeqjax implements")
  return ModelConfig(
      vocab_size=int(_field(cfg, "vocab_size", required=True)),
      d_model=d_model,
      num_layers=num_layers,
      num_heads=heads,
      num_kv_heads=kv_heads,
      head_dim=head_dim,
      d_ff=int(_field(cfg, fam.d_ff_key, required=True)),
      num_experts=int(num_experts),
      top_k=int(_field(cfg, "num_experts_per_tok", required=True)),
      # Mixtral always renormalises (softmax over the top-k logits); the others have the flag.
      norm_topk_prob=True if fam.model_type == "mixtral" else bool(
          _field(cfg, "norm_topk_prob", False)),
      shared_d_ff=shared_d_ff,
      shared_expert_gate=shared_d_ff > 0,
      rope_theta=_rope_theta(cfg),
      norm_eps=float(_field(cfg, "rms_norm_eps", 1e-6)),
      qk_norm={"qwen3_moe": "head", "olmoe": "full"}.get(fam.model_type, "none"),
      attn_bias=attn_bias,
      attn_out_bias=out_bias,
      clip_qkv=float(_field(cfg, "clip_qkv", 0.0)) if fam.model_type == "olmoe" else 0.0,
      tie_embeddings=bool(_field(cfg, "tie_word_embeddings", False)),
      dispatch="ragged",
      max_seq_len=int(_field(cfg, "max_position_embeddings", 4096)),
      dtype=dtype,
      param_dtype=dtype,
      quant=quant or QuantRules(),
  )


def infer_model_type(cfg: ModelConfig) -> str:
  """The HF family whose layout can hold `cfg` (used when no original config.json is given)."""
  if cfg.qk_norm == "full":
    return "olmoe"
  if cfg.qk_norm == "head":
    return "qwen3_moe"
  if cfg.shared_d_ff or cfg.attn_bias:
    return "qwen2_moe"
  return "mixtral"


def model_config_to_hf_config(cfg: ModelConfig, model_type: str | None = None,
                              template: dict | None = None, dtype: str = "float32") -> dict:
  """The HF config.json of a model with our config, in the layout of `model_type`.

  Args:
    cfg: our model config.
    model_type: the HF family; None takes the template's, else infers one from cfg.
    template: the original config.json; its other keys (token ids, metadata) are kept.
    dtype: the dtype of the weights that will be written next to it.

  Raises:
    ConvertError: the family cannot express a feature of cfg (the field is named).
  """
  out = dict(template or {})
  model_type = model_type or out.get("model_type") or infer_model_type(cfg)
  fam = family_of({"model_type": model_type})
  want = {"none": ("mixtral", "qwen2_moe"), "head": ("qwen3_moe",), "full": ("olmoe",)}
  if model_type not in want[cfg.qk_norm]:
    raise ConvertError(f"model.qk_norm={cfg.qk_norm!r} cannot be written as {model_type}")
  if cfg.shared_d_ff and model_type != "qwen2_moe":
    raise ConvertError(f"model.shared_d_ff={cfg.shared_d_ff}: only qwen2_moe has a shared expert")
  if cfg.shared_d_ff and not cfg.shared_expert_gate:
    raise ConvertError("model.shared_expert_gate=False cannot be written as qwen2_moe (its shared "
                       "expert always has a sigmoid gate)")
  if model_type == "mixtral" and not cfg.norm_topk_prob:
    raise ConvertError("model.norm_topk_prob=False cannot be written as mixtral (it always "
                       "renormalises the top-k gates)")
  if model_type == "mixtral" and (cfg.attn_bias or cfg.attn_out_bias):
    raise ConvertError("model.attn_bias cannot be written as mixtral (no attention biases)")
  if model_type == "qwen2_moe" and cfg.attn_out_bias:
    raise ConvertError("model.attn_out_bias cannot be written as qwen2_moe (no o_proj bias)")
  if model_type in ("qwen3_moe", "olmoe") and cfg.attn_bias != cfg.attn_out_bias:
    raise ConvertError(f"{model_type} has one attention_bias flag for q/k/v and o; model.attn_bias "
                       "and model.attn_out_bias must be equal")
  if cfg.clip_qkv and model_type != "olmoe":
    raise ConvertError(f"model.clip_qkv={cfg.clip_qkv}: only olmoe clips q/k/v")
  if model_type == "olmoe" and cfg.head_dim * cfg.num_heads != cfg.d_model:
    raise ConvertError("olmoe needs head_dim * num_heads == d_model")
  if cfg.quant.act_bits:
    raise ConvertError("quant.act_bits=8 (int8 activations) has no Hugging Face equivalent; "
                       "export a weight-only model")
  out.update({
      "model_type": model_type,
      "architectures": [fam.architecture],
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      fam.d_ff_key: cfg.d_ff,
      "num_experts_per_tok": cfg.top_k,
      "hidden_act": "silu",
      "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings,
      "max_position_embeddings": out.get("max_position_embeddings", cfg.max_seq_len),
      "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
      "torch_dtype" if "torch_dtype" in out else "dtype": dtype,
  })
  out.pop("rope_scaling", None)
  out.pop("rope_theta", None)
  out.pop("num_local_experts" if fam.experts_key == "num_experts" else "num_experts", None)
  out[fam.experts_key] = cfg.num_experts
  if model_type != "olmoe":
    out["head_dim"] = cfg.head_dim
  if model_type != "mixtral":
    out["norm_topk_prob"] = cfg.norm_topk_prob
  if model_type == "qwen2_moe":
    out["shared_expert_intermediate_size"] = cfg.shared_d_ff
    out["qkv_bias"] = cfg.attn_bias
    out.setdefault("intermediate_size", cfg.d_ff)
  if model_type in ("qwen2_moe", "qwen3_moe"):
    out["decoder_sparse_step"] = 1
    out["mlp_only_layers"] = []
  if model_type in ("qwen3_moe", "olmoe"):
    out["attention_bias"] = cfg.attn_bias
  if model_type == "olmoe":
    out["clip_qkv"] = cfg.clip_qkv or None
  return out
