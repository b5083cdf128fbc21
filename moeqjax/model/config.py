"""Model and quantization-rule configuration dataclasses."""

from __future__ import annotations

import dataclasses

# One-letter dims used in tensor names across the package:
#   B batch, S sequence, T tokens (B*S flattened), D d_model, F expert hidden,
#   E experts, K top-k, V vocab, H query heads, G kv heads, A head_dim, L layers.

QK_NORM_CHOICES = ("none", "head", "full")
DISPATCH_CHOICES = ("ragged", "dense", "ep")
DTYPE_CHOICES = ("float32", "bfloat16")
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
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in DTYPE_CHOICES:
        raise ValueError(f"model.{name}={getattr(self, name)!r}; choose from {DTYPE_CHOICES}")
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "num_experts"):
      if getattr(self, name) < 1:
        raise ValueError(f"model.{name}={getattr(self, name)} must be positive")

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)
