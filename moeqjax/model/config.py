"""Model and quantization-rule configuration dataclasses."""

from __future__ import annotations

import dataclasses

# One-letter dims used in tensor names across the package:
#   B batch, S sequence, T tokens (B*S flattened), D d_model, F expert hidden,
#   E experts, K top-k, V vocab, H query heads, G kv heads, A head_dim, L layers.

QK_NORM_CHOICES = ("none", "head", "full")
DISPATCH_CHOICES = ("ragged", "dense", "ep")
DTYPE_CHOICES = ("float32", "bfloat16")
# "swiglu": w_in, w_gate, w_out (Mixtral, Qwen-MoE, OLMoE); "relu": w_in, w_out (Switch, T5)
EXPERT_ACT_CHOICES = ("swiglu", "relu")
# 0 trains the experts at full precision: a QAT run's same-objective control (`moeqjax eval --control`).
EXPERT_CODE_CHOICES = (0, 1, 2, 3, 4, 8)
OPTIONAL_CODE_CHOICES = (0, 1, 2, 3, 4, 8)


@dataclasses.dataclass(frozen=True)
class QuantRules:
  """What is quantized and how. Codes: 0 full precision, 1 ternary, 2/3/4/8 intN.

  The codes here are the *defaults* written into the `quant` variable collection at init.
  The collection holds the live codes as traced int32 arrays, so an allocation changes
  them without a recompile. A rule of 0 means the tensor never gets a quantizer at all.
  """

  expert_code: int = 4  # default code of every routed expert; 0 = full precision (a control)
  attn_code: int = 0  # q/k/v/o projections; 0 keeps attention full precision
  shared_code: int = 0  # shared expert(s); 0 keeps them full precision
  router_code: int = 0  # router stays full precision by default (routing decisions are fragile)
  lm_head_code: int = 0  # output projection; embeddings and norms are never quantized
  act_bits: int = 0  # 0 = weights only; 8 = W*A8 (int8 absmax per token on quantized matmul inputs)
  granularity: str = "channel"  # "tensor" | "channel" | "group"
  group_size: int = 32  # input weights per scale when granularity == "group"
  symmetric: bool = True  # False adds a zero point per group (intN only)
  ternary_method: str = "absmean"  # "absmean" (BitNet b1.58) | "twn"
  learn_clip: bool = False  # learnable clipping ratio per expert output channel (intN only)
  ternary_packing: str = "2bit"  # storage of ternary weights: "2bit" or "base3" (1.6 bits)
  scale_bytes: int = 2  # bytes per stored scale (fp16)
  scale_init: str = "absmax"  # "absmax" | "mse": grid-searched MSE-optimal scale per group
  learn_scale: bool = False  # LSQ scale ratio per group, ternary and intN (exclusive with learn_clip)
  stored_ratio: bool = False  # fixed intN scale ratios per group in `*_clip` params (GPTQ's scales)

  def __post_init__(self):
    if self.expert_code not in EXPERT_CODE_CHOICES:
      raise ValueError(
          f"quant.expert_code={self.expert_code} is unsupported; choose from {EXPERT_CODE_CHOICES}"
          " (0 = full precision, 1 = ternary)")
    for name in ("attn_code", "shared_code", "router_code", "lm_head_code"):
      code = getattr(self, name)
      if code not in OPTIONAL_CODE_CHOICES:
        raise ValueError(
            f"quant.{name}={code} is unsupported; choose from {OPTIONAL_CODE_CHOICES}"
            " (0 = full precision, 1 = ternary)")
    if self.act_bits not in (0, 8):
      raise ValueError(f"quant.act_bits={self.act_bits} is unsupported; use 0 (off) or 8")
    self.spec()  # the quantizer's own checks (granularity, scale_init, ...), at config time

  @property
  def learns_ratio(self) -> bool:
    """Whether the student trains scale ratios (`*_clip` params): learn_clip or learn_scale."""
    return bool(self.learn_clip or self.learn_scale)

  @property
  def has_ratio(self) -> bool:
    """Whether the student carries `*_clip` ratio params: learned, or stored by GPTQ."""
    return bool(self.learns_ratio or self.stored_ratio)

  def spec(self):
    """The array-level quantizer spec (moeqjax.quant.QuantSpec) for these rules."""
    from moeqjax.quant import QuantSpec  # local: keeps config importable without jax
    return QuantSpec(
        granularity=self.granularity,
        group_size=self.group_size,
        symmetric=self.symmetric,
        ternary_method=self.ternary_method,
        learn_clip=self.learn_clip,
        ternary_packing=self.ternary_packing,
        scale_bytes=self.scale_bytes,
        scale_init=self.scale_init,
        learn_scale=self.learn_scale,
        stored_ratio=self.stored_ratio,
    )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only MoE transformer. Family differences are fields, never name checks."""

  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2  # grouped-query attention; must divide num_heads
  head_dim: int = 16
  d_ff: int = 128  # hidden size of one routed expert
  num_experts: int = 8
  top_k: int = 2
  norm_topk_prob: bool = True  # renormalise the top-k gates to sum to 1 (Mixtral: True, OLMoE: False)
  expert_act: str = "swiglu"  # "swiglu" (gated, three matrices) | "relu" (two matrices, Switch)
  router_bias: bool = False  # a bias on the router's logits (HF Switch `router_bias`)
  # Multiplicative router-input noise at training only: x * U[1 - j, 1 + j] (Switch's jitter;
  # HF `router_jitter_noise`). Needs a "jitter" rng and train=True; 0 = off.
  router_jitter: float = 0.0
  shared_d_ff: int = 0  # hidden size of the shared expert(s), 0 = none (Qwen2-MoE uses one)
  shared_expert_gate: bool = False  # sigmoid gate on the shared expert output (Qwen2-MoE)
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  qk_norm: str = "none"  # "none" | "head" (RMSNorm per head, Qwen3) | "full" (over all heads, OLMoE)
  attn_bias: bool = False  # bias on q/k/v projections (Qwen2)
  attn_out_bias: bool = False  # bias on the o projection too (HF `attention_bias` of Qwen3-MoE / OLMoE)
  clip_qkv: float = 0.0  # clamp q/k/v to [-c, c] when > 0, after a "full" q/k norm (OLMoE option)
  tie_embeddings: bool = False
  # "ragged" (dropless grouped matmul) | "dense" (masked, test oracle) | "ep" (dropless expert
  # parallelism over the context mesh's expert axis; "ragged" without one)
  dispatch: str = "ragged"
  # 0 = dropless (the default). C > 0: in each sequence of S tokens an expert accepts at most
  # ceil(C * S*k / E) of its (token, k) pairs, 1st choices first, then in token order; the others
  # are dropped (their gate contribution is zero) on every dispatch (model.capacity.capacity_keep)
  capacity_factor: float = 0.0
  # A fixed per-sequence capacity (HF Switch's `expert_capacity`): in each sequence an expert
  # accepts its first `expert_capacity` pairs; 0 = use capacity_factor (exclusive with it)
  expert_capacity: int = 0
  max_seq_len: int = 128
  dtype: str = "float32"  # activation dtype
  param_dtype: str = "float32"
  quant: QuantRules = dataclasses.field(default_factory=QuantRules)

  def __post_init__(self):
    if self.top_k < 1 or self.top_k > self.num_experts:
      raise ValueError(
          f"model.top_k={self.top_k} must be between 1 and model.num_experts={self.num_experts}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"model.num_kv_heads={self.num_kv_heads} must divide model.num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for rotary embeddings")
    if self.qk_norm not in QK_NORM_CHOICES:
      raise ValueError(f"model.qk_norm={self.qk_norm!r}; choose from {QK_NORM_CHOICES}")
    if self.dispatch not in DISPATCH_CHOICES:
      raise ValueError(f"model.dispatch={self.dispatch!r}; choose from {DISPATCH_CHOICES}")
    if not self.capacity_factor >= 0 or self.capacity_factor == float("inf"):
      raise ValueError(f"model.capacity_factor={self.capacity_factor} must be a finite number "
                       ">= 0 (0 = dropless, the default; e.g. 1.25 drops the overflow)")
    if self.expert_act not in EXPERT_ACT_CHOICES:
      raise ValueError(f"model.expert_act={self.expert_act!r}; choose from {EXPERT_ACT_CHOICES}")
    if not 0 <= self.router_jitter < 1:
      raise ValueError(f"model.router_jitter={self.router_jitter} must be in [0, 1) (0 = off; "
                       "Switch uses 0.01)")
    if self.expert_capacity < 0:
      raise ValueError(f"model.expert_capacity={self.expert_capacity} must be >= 0 (0 = none)")
    if self.expert_capacity and self.capacity_factor:
      raise ValueError(f"model.expert_capacity={self.expert_capacity} and model.capacity_factor="
                       f"{self.capacity_factor} both set a capacity; set one of them to 0")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPE_CHOICES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; choose from {DTYPE_CHOICES}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "num_experts"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive")

  @property
  def has_capacity(self) -> bool:
    """Whether the experts drop pairs over a capacity (capacity_factor or expert_capacity)."""
    return self.capacity_factor > 0 or self.expert_capacity > 0

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


def hf_sparse_layers(num_layers: int, num_sparse: int) -> tuple[int, ...]:
  """The layers Hugging Face's Switch makes sparse for `num_sparse` of `num_layers`.

  step = num_layers // num_sparse (num_layers when num_sparse is 0), and layer i is sparse when
  i % step == 1 or step == 1: the 2nd layer of each group of `step`, or every layer.
  """
  step = num_layers // num_sparse if num_sparse > 0 else num_layers
  if step == 0:
    return ()
  return tuple(i for i in range(num_layers) if step == 1 or i % step == 1)


@dataclasses.dataclass(frozen=True)
class SwitchConfig:
  """An encoder-decoder Switch Transformer (T5 layers, top-1 ReLU experts in the sparse layers).

  The MoE blocks run the decoder-only model's MoE with `moe_config()`, a ModelConfig whose
  fields (expert_act="relu", top_k=1, router_bias, router_jitter, expert_capacity) say how
  Switch routes; everything here is what the encoder-decoder around them needs. Field names
  follow Hugging Face's SwitchTransformersConfig where they mean the same.
  """

  vocab_size: int = 256
  d_model: int = 64
  d_kv: int = 16  # head dim of every attention
  num_heads: int = 4
  d_ff: int = 128  # hidden size of a dense FFN and of one expert
  num_layers: int = 2  # encoder layers
  num_decoder_layers: int = 2
  # Sparse layers as HF counts them (hf_sparse_layers): the count must be what HF's rule builds
  num_sparse_encoder_layers: int = 1
  num_sparse_decoder_layers: int = 1
  num_experts: int = 8
  # In each sequence an expert takes its first `expert_capacity` tokens; the rest skip the FFN
  # (0 = no capacity). HF applies it per forward call, so a cached decode step never drops.
  expert_capacity: int = 0
  router_bias: bool = False
  router_jitter: float = 0.0  # multiplicative router-input noise at training only (HF 0.01)
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  norm_eps: float = 1e-6
  # One embedding for encoder input, decoder input and the LM head (which then reads the decoder
  # output times d_model**-0.5); False: three separate matrices and no rescale, as in HF
  tie_embeddings: bool = True
  decoder_start_token_id: int = 0  # the decoder's first input token
  dispatch: str = "ragged"
  dtype: str = "float32"
  param_dtype: str = "float32"
  quant: QuantRules = dataclasses.field(default_factory=QuantRules)

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "d_kv", "num_heads", "d_ff", "num_layers",
                 "num_decoder_layers", "num_experts", "relative_attention_num_buckets"):
      if getattr(self, name) < 1:
        raise ValueError(f"switch.{name}={getattr(self, name)} must be positive")
    for stack, layers in (("encoder", "num_layers"), ("decoder", "num_decoder_layers")):
      n, sparse = getattr(self, layers), getattr(self, f"num_sparse_{stack}_layers")
      built = hf_sparse_layers(n, sparse)
      if sparse < 0 or sparse > n or len(built) != sparse:
        raise ValueError(
            f"switch.num_sparse_{stack}_layers={sparse} does not fit switch.{layers}={n}: HF's "
            f"rule (step = {layers} // num_sparse, layer i sparse when i % step == 1 or "
            f"step == 1) makes {len(built)} sparse layer(s) {list(built)}; use a count it makes "
            f"exactly, e.g. 1 or {n}")
    # T5 buckets: the first half of a direction's buckets are exact offsets, the rest log-spaced
    # up to max_distance, so max_distance must exceed the exact range.
    if self.relative_attention_max_distance <= self.relative_attention_num_buckets // 2:
      exact = self.relative_attention_num_buckets // 2
      raise ValueError(
          f"switch.relative_attention_max_distance={self.relative_attention_max_distance} must "
          f"exceed relative_attention_num_buckets // 2 = {exact}")
    if not 0 <= self.decoder_start_token_id < self.vocab_size:
      raise ValueError(f"switch.decoder_start_token_id={self.decoder_start_token_id} is not a "
                       f"token id of the vocabulary (size {self.vocab_size})")
    self.moe_config()  # the MoE block's own checks (expert_capacity, jitter, dispatch, dtypes)

  @property
  def encoder_sparse_layers(self) -> tuple[int, ...]:
    return hf_sparse_layers(self.num_layers, self.num_sparse_encoder_layers)

  @property
  def decoder_sparse_layers(self) -> tuple[int, ...]:
    return hf_sparse_layers(self.num_decoder_layers, self.num_sparse_decoder_layers)

  def moe_config(self) -> ModelConfig:
    """The ModelConfig of the sparse layers' MoE block (its attention fields are unused)."""
    return ModelConfig(
        vocab_size=self.vocab_size, d_model=self.d_model, d_ff=self.d_ff,
        num_experts=self.num_experts, top_k=1, norm_topk_prob=False, expert_act="relu",
        router_bias=self.router_bias, router_jitter=self.router_jitter,
        expert_capacity=self.expert_capacity, norm_eps=self.norm_eps, dispatch=self.dispatch,
        dtype=self.dtype, param_dtype=self.param_dtype, quant=self.quant)

  def replace(self, **changes) -> "SwitchConfig":
    return dataclasses.replace(self, **changes)
