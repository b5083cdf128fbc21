"""The MoE feed-forward block: linear router, top-k gating, SwiGLU or ReLU experts, optional shared expert."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moeqjax import quant as q
from moeqjax.model.config import ModelConfig
from moeqjax.model import packed_weights
from moeqjax.model.capacity import capacity_keep
from moeqjax.model.dispatch import DISPATCH as _LOCAL_DISPATCH, gathered_experts, swiglu
from moeqjax.model.expert_parallel import expert_parallel_experts
from moeqjax.model.layers import QDense, expert_act_quant, maybe_quant_act, quant_codes
from moeqjax.model.projection_codes import layer_codes
from moeqjax.model.routing import load_balance_loss, router_z_loss, topk_gates

DISPATCH = {**_LOCAL_DISPATCH, "ep": expert_parallel_experts}
_expert_init = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))


def _fixed_ratio_quant(w, codes, spec, ratio):
  """Fake quantization at a stored (GPTQ) ratio: a plain straight-through estimator, no ratio grad.

  The ratio is GPTQ's choice, not a parameter to train, so it gets no gradient (Adam then leaves it
  unchanged) and the weight's gradient is not clipped as learn_clip's is.
  """
  w_f = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  w_q = q.quantize_dequantize(w_f, codes, spec, jax.lax.stop_gradient(ratio))
  return (w_f + jax.lax.stop_gradient(w_q - w_f)).astype(w.dtype)


class SharedExpert(nn.Module):
  """A dense SwiGLU FFN every token passes through, optionally scaled by a sigmoid gate."""

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_TxD):
    cfg, rules = self.cfg, self.cfg.quant
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def dense(name, feats, axes):
      return QDense(feats, axes, rules, rules.shared_code, dtype=dtype, param_dtype=pdtype,
                    name=name)

    h = swiglu(dense("gate_proj", cfg.shared_d_ff, ("embed", "mlp"))(x_TxD),
               dense("up_proj", cfg.shared_d_ff, ("embed", "mlp"))(x_TxD))
    y = dense("down_proj", cfg.d_model, ("mlp", "embed"))(h)
    if cfg.shared_expert_gate:
      gate = QDense(1, ("embed", None), rules, 0, dtype=dtype, param_dtype=pdtype,
                    name="gate")(x_TxD)
      y = jax.nn.sigmoid(gate.astype(jnp.float32)).astype(y.dtype) * y
    return y


def expert_param_names(cfg: ModelConfig) -> tuple[str, ...]:
  """The stacked expert params of cfg's experts: SwiGLU has a gate projection, ReLU does not."""
  return ("w_in", "w_gate", "w_out") if cfg.expert_act == "swiglu" else ("w_in", "w_out")


class MoE(nn.Module):
  """Routed experts stacked as w_in/w_gate [E, D, F] and w_out [E, F, D] (ReLU experts: no w_gate).

  Returns the block output and a dict of routing tensors (router logits, expert ids,
  gates, auxiliary losses) that the objectives and router statistics consume. With
  model.router_jitter and train=True the router reads a jittered input (a "jitter" rng).
  """

  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxSxD, train: bool = False):
    cfg, rules = self.cfg, self.cfg.quant
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, s, d = x_BxSxD.shape
    e = cfg.num_experts
    x_TxD = x_BxSxD.reshape(b * s, d)

    router_in_TxD = x_TxD
    if train and cfg.router_jitter > 0:
      # Only the routing decision sees the noise; the experts read the clean input.
      router_in_TxD = x_TxD.astype(jnp.float32) * jax.random.uniform(
          self.make_rng("jitter"), x_TxD.shape, jnp.float32, 1.0 - cfg.router_jitter,
          1.0 + cfg.router_jitter)
    logits_TxE = QDense(e, ("embed", "expert"), rules, rules.router_code,
                        use_bias=cfg.router_bias, dtype=jnp.float32, param_dtype=pdtype,
                        name="router")(router_in_TxD)
    probs_TxE, gates_TxK, idx_TxK = topk_gates(logits_TxE, cfg.top_k, cfg.norm_topk_prob)
    # With a capacity, the pairs over it are dropped from the experts' computation only: the
    # routing in aux (and so the losses and router statistics) is the router's own.
    keep_TxK = None
    if cfg.has_capacity:
      keep_TxK = capacity_keep(idx_TxK.reshape(b, s, -1), e, capacity_factor=cfg.capacity_factor,
                               capacity=cfg.expert_capacity).reshape(idx_TxK.shape)

    if self.has_variable(packed_weights.COLLECTION, "w_in"):
      y_TxD = self._packed_experts(x_TxD, gates_TxK, idx_TxK, keep_TxK)
    else:
      y_TxD = self._float_experts(x_TxD, gates_TxK, idx_TxK, keep_TxK)
    if cfg.shared_d_ff:
      y_TxD = y_TxD + SharedExpert(cfg, name="shared_expert")(x_TxD)

    y_BxSxD = y_TxD.reshape(b, s, d).astype(dtype)
    aux = {
        "router_logits": logits_TxE,
        "expert_idx": idx_TxK,
        "gates": gates_TxK,
        "lb_loss": load_balance_loss(probs_TxE, idx_TxK),
        "z_loss": router_z_loss(logits_TxE),
        "moe_out": y_BxSxD,
        # fraction of the T*k pairs dropped by the capacity (0 when dropless)
        "drop_rate": (jnp.zeros((), jnp.float32) if keep_TxK is None
                      else 1.0 - jnp.mean(keep_TxK.astype(jnp.float32))),
    }
    return y_BxSxD, aux

  def _float_experts(self, x_TxD, gates_TxK, idx_TxK, keep_TxK):
    """Experts from float params: full precision, or fake-quantized at the `quant` codes."""
    cfg, rules = self.cfg, self.cfg.quant
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff

    def expert_param(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(_expert_init, axes), shape, pdtype)

    gated = "w_gate" in expert_param_names(cfg)
    w_in = expert_param("w_in", (e, d, f), ("expert", "embed", "mlp"))
    w_gate = expert_param("w_gate", (e, d, f), ("expert", "embed", "mlp")) if gated else None
    w_out = expert_param("w_out", (e, f, d), ("expert", "mlp", "embed"))

    # [E], or [3, E] with one code per projection (model.projection_codes).
    codes = quant_codes(self, "expert_bits",
                        lambda: jnp.full((e,), rules.expert_code, jnp.int32))
    # An expert reads quantized activations when any of its matrices is quantized.
    x_q, act_quant_E = expert_act_quant(
        x_TxD, rules, None if codes is None else jnp.max(codes.reshape(-1, e), axis=0))
    if codes is not None:
      spec = rules.spec()
      clip = self._ratios(spec, e, d, f, pdtype) if spec.has_ratio else (None, None, None)
      quantize = q.fake_quant if not spec.stored_ratio else _fixed_ratio_quant
      w_in = quantize(w_in, layer_codes(codes, "w_in"), spec, clip[0])
      w_gate = quantize(w_gate, layer_codes(codes, "w_gate"), spec, clip[1]) if gated else None
      w_out = quantize(w_out, layer_codes(codes, "w_out"), spec, clip[2])
    elif idx_TxK.size < e:
      # Full precision at decode size: read only the selected experts, as the packed path does.
      idx_M = idx_TxK.reshape(-1)
      w_in, w_gate, w_out = (None if w is None else jnp.take(w, idx_M, axis=0).astype(dtype)
                             for w in (w_in, w_gate, w_out))
      return gathered_experts(x_TxD.astype(dtype), w_in, w_gate, w_out, gates_TxK, keep_TxK)
    return DISPATCH[cfg.dispatch](
        x_TxD.astype(dtype), w_in.astype(dtype), None if w_gate is None else w_gate.astype(dtype),
        w_out.astype(dtype), gates_TxK, idx_TxK,
        x_q_TxD=None if x_q is None else x_q.astype(dtype), act_quant_E=act_quant_E,
        keep_TxK=keep_TxK)

  def _packed_experts(self, x_TxD, gates_TxK, idx_TxK, keep_TxK):
    """Experts from the `packed` collection, dequantized inside the computation.

    When fewer (token, expert) pairs than experts are routed (decode), only the selected experts
    are read and dequantized; otherwise every expert is dequantized once and dispatched as usual.
    """
    cfg, rules = self.cfg, self.cfg.quant
    dtype, spec = jnp.dtype(cfg.dtype), rules.spec()
    e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
    shapes = {name: {"w_in": (d, f), "w_gate": (d, f), "w_out": (f, d)}[name]
              for name in expert_param_names(cfg)}
    nodes = {name: self.get_variable(packed_weights.COLLECTION, name) for name in shapes}
    # Packed experts are all quantized (pack refuses code 0), as the student's were.
    x_in = maybe_quant_act(x_TxD, rules, True).astype(dtype)
    if idx_TxK.size < e:
      idx_M = idx_TxK.reshape(-1)
      w = {name: packed_weights.experts(nodes[name], idx_M, shape, spec).astype(dtype)
           for name, shape in shapes.items()}
      return gathered_experts(x_in, w["w_in"], w.get("w_gate"), w["w_out"], gates_TxK, keep_TxK)
    w = {name: packed_weights.all_experts(nodes[name], shape, spec).astype(dtype)
         for name, shape in shapes.items()}
    return DISPATCH[cfg.dispatch](x_in, w["w_in"], w.get("w_gate"), w["w_out"], gates_TxK,
                                  idx_TxK, keep_TxK=keep_TxK)

  def _ratios(self, spec, e, d, f, pdtype):
    """Scale ratios (clip ratios, LSQ scales or GPTQ's stored ones), one per quantization group, at 1.

    A QAT start replaces the 1s with its initial ratios (model.ratios.init_ratios), and a ptq GPTQ
    run with GPTQ's. The train step
    projects the raw params into range after each update; the forward pass reads them through
    q.effective_clip_ratio like export does, with a straight-through gradient.
    """
    def ratio(name, w_shape, axes):
      shape = q.scale_shape(w_shape, spec)
      # Named like the kernel's dims they follow; the group axis and size-1 axes stay unsharded.
      names = (axes[0], None, None if shape[-1] == 1 else axes[2])
      init = nn.with_logical_partitioning(nn.initializers.ones, names)
      return q.effective_clip_ratio(self.param(name, init, shape, pdtype), spec)
    gated = "w_gate" in expert_param_names(self.cfg)
    return (ratio("w_in_clip", (e, d, f), ("expert", "embed", "mlp")),
            ratio("w_gate_clip", (e, d, f), ("expert", "embed", "mlp")) if gated else None,
            ratio("w_out_clip", (e, f, d), ("expert", "mlp", "embed")))
