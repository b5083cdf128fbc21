"""The transformer: shapes, logical axes, teacher vs student paths, config validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.model import QuantRules, forward_with_aux, init_model, param_axes


def test_shapes_and_aux(tiny_cfg, tokens):
  model, params, quant = init_model(tiny_cfg, jax.random.key(0))
  logits, aux = forward_with_aux(model, {"params": params}, tokens)
  b, s = tokens.shape
  assert logits.shape == (b, s, tiny_cfg.vocab_size) and logits.dtype == jnp.float32
  assert aux["router_logits"].shape == (2, b * s, 4)
  assert aux["expert_idx"].shape == (2, b * s, 2)
  assert aux["moe_out"].shape == (2, b, s, 16)
  assert quant["layers_0"]["moe"]["expert_bits"].tolist() == [1, 1, 1, 1]


def test_every_param_has_logical_axes(tiny_cfg):
  axes = param_axes(tiny_cfg)
  leaves = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  assert leaves and all(isinstance(a, jax.sharding.PartitionSpec) and len(a) > 0 for a in leaves)
  assert tuple(axes["layers_0"]["moe"]["w_in"]) == ("expert", "embed", "mlp")
  assert tuple(axes["embedding"]) == ("vocab", "embed")


def test_teacher_is_full_precision_and_student_quantized(tiny_cfg, tokens):
  model, params, quant = init_model(tiny_cfg, jax.random.key(0))
  fp = model.apply({"params": params}, tokens)
  student = model.apply({"params": params, "quant": quant}, tokens)
  assert float(jnp.abs(fp - student).max()) > 1e-3  # ternary changes the output
  fp_codes = jax.tree.map(jnp.zeros_like, quant)  # code 0 = full precision
  np.testing.assert_allclose(model.apply({"params": params, "quant": fp_codes}, tokens), fp,
                             rtol=1e-6, atol=1e-6)


def test_causality(tiny_cfg, tokens):
  model, params, _ = init_model(tiny_cfg, jax.random.key(0))
  full = model.apply({"params": params}, tokens)
  changed = tokens.at[:, -1].set((tokens[:, -1] + 1) % 64)
  other = model.apply({"params": params}, changed)
  # Routing is per token, so earlier positions must be unaffected by a later token.
  np.testing.assert_allclose(full[:, :-1], other[:, :-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes,words", [
    (dict(top_k=5), "top_k=5 must be between 1 and model.num_experts=4"),
    (dict(num_kv_heads=3), "must divide"),
    (dict(dispatch="sparse"), "dispatch"),
])
def test_config_errors(changes, words):
  with pytest.raises(ValueError, match=words):
    tiny_model_config(**changes)


def test_quant_rule_errors():
  with pytest.raises(ValueError, match="expert_code=5 is unsupported"):
    QuantRules(expert_code=5)


def test_attention_quant_and_shared_expert_paths(tokens):
  cfg = tiny_model_config(shared_d_ff=16, shared_expert_gate=True, qk_norm="head", attn_bias=True,
                          quant=QuantRules(expert_code=4, attn_code=8, shared_code=4, act_bits=8))
  model, params, quant = init_model(cfg, jax.random.key(1))
  assert int(quant["layers_0"]["attn"]["q_proj"]["bits"]) == 8
  assert int(quant["layers_1"]["moe"]["shared_expert"]["up_proj"]["bits"]) == 4
  out = model.apply({"params": params, "quant": quant}, tokens)
  assert np.isfinite(np.asarray(out)).all()


def test_learnable_clip_ratio_gets_gradient(tokens):
  cfg = tiny_model_config(quant=QuantRules(expert_code=4, learn_clip=True))
  model, params, quant = init_model(cfg, jax.random.key(2))
  clip = params["layers_0"]["moe"]["w_in_clip"]
  assert clip.shape == (4, 1, 32) and np.all(np.asarray(clip) == 1.0)

  def loss(p):
    return jnp.mean(model.apply({"params": p, "quant": quant}, tokens) ** 2)

  grads = jax.grad(loss)(params)
  assert float(jnp.abs(grads["layers_0"]["moe"]["w_in_clip"]).sum()) > 0
  # the teacher path ignores the clip parameters entirely
  fp_grads = jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))(params)
  assert float(jnp.abs(fp_grads["layers_0"]["moe"]["w_in_clip"]).sum()) == 0
