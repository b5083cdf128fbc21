"""The effective clip ratio: one definition for the model, export, memory and allocation code."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.eval import model_memory
from moeqjax.model import MoETransformer, QuantRules, init_model
from moeqjax.quant import effective_clip_ratio, quantize_dequantize

RAW = np.array([-0.3, 0.0, 0.01, 0.05, 0.4, 1.0, 1.2, 7.0], np.float32)
WANT = np.array([0.05, 0.05, 0.05, 0.05, 0.4, 1.0, 1.0, 1.0], np.float32)


def test_effective_clip_ratio_values_types_and_gradient():
  """Issue 11 defect 2: the helper `moeqjax.quant.effective_clip_ratio` clamps to [0.05, 1].

  numpy in gives numpy out (export, packing), jax in gives jax out (the model), and the gradient is
  the identity so that the forward clamp never stops a ratio from learning.
  """
  got_np = effective_clip_ratio(RAW)
  assert isinstance(got_np, np.ndarray) and got_np.dtype == np.float32
  np.testing.assert_array_equal(got_np, WANT)
  got_jax = effective_clip_ratio(jnp.asarray(RAW))
  assert isinstance(got_jax, jax.Array) and got_jax.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got_jax), WANT)
  grad = jax.grad(lambda r: jnp.sum(effective_clip_ratio(r) * jnp.arange(8.0)))(jnp.asarray(RAW))
  np.testing.assert_array_equal(np.asarray(grad), np.arange(8.0))


def _student_with_raw_clip(seed=0):
  cfg = tiny_model_config(quant=QuantRules(expert_code=4, learn_clip=True))
  _, params, quant = init_model(cfg, jax.random.key(seed))
  r = np.random.default_rng(seed)
  raw_params = jax.tree.map(np.asarray, params)
  for l in range(cfg.num_layers):
    moe = raw_params[f"layers_{l}"]["moe"]
    for name in ("w_in_clip", "w_gate_clip", "w_out_clip"):
      # Raw values on both sides of the range, as an old checkpoint may hold them.
      moe[name] = r.uniform(-0.2, 1.5, size=moe[name].shape).astype(np.float32)
  clamped = jax.tree_util.tree_map_with_path(
      lambda path, x: effective_clip_ratio(x) if path[-1].key.endswith("_clip") else x, raw_params)
  return cfg, raw_params, clamped, quant


def test_export_uses_the_effective_clip_ratio():
  """Issue 11 defect 2: export dequantized with the raw ratio, unlike the trained student."""
  from moeqjax.convert.student_weights import ParamWeights
  cfg, raw_params, clamped, quant = _student_with_raw_clip()
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 12)), jnp.int32)
  model = MoETransformer(cfg)
  np.testing.assert_array_equal(  # the student computes with the effective ratio
      np.asarray(model.apply({"params": raw_params, "quant": quant}, tokens)),
      np.asarray(model.apply({"params": clamped, "quant": quant}, tokens)))
  for l in range(cfg.num_layers):
    for name in ("w_in", "w_gate", "w_out"):
      path = (f"layers_{l}", "moe", name)
      moe = clamped[f"layers_{l}"]["moe"]
      want = np.asarray(quantize_dequantize(moe[name], quant[f"layers_{l}"]["moe"]["expert_bits"],
                                            cfg.quant.spec(), moe[name + "_clip"]))
      np.testing.assert_array_equal(ParamWeights(cfg, raw_params, quant).dequantized(path), want,
                                    err_msg="/".join(path))


def test_memory_report_does_not_count_clip_ratios_as_weights():
  """Issue 11 defect 2: `model_memory` counted the *_clip params as bf16 model weights."""
  cfg, raw_params, _, quant = _student_with_raw_clip()
  plain_cfg = cfg.replace(quant=QuantRules(expert_code=4, learn_clip=False))
  _, plain_params, plain_quant = init_model(plain_cfg, jax.random.key(0))
  with_clip = model_memory(cfg, raw_params, quant)
  without = model_memory(plain_cfg, plain_params, plain_quant)
  assert with_clip == without


@pytest.mark.parametrize("symmetric", [True, False])
def test_quant_error_table_uses_the_learned_clip_ratio(symmetric):
  """Issue 11 defect 2: the allocation's error table ignored trained clip ratios."""
  from moeqjax.alloc.allocation import quant_error_table
  cfg, raw_params, clamped, _ = _student_with_raw_clip()
  cfg = cfg.replace(quant=QuantRules(expert_code=4, learn_clip=True, symmetric=symmetric))
  choices = (1, 2, 4)
  got = quant_error_table(raw_params, cfg, choices)
  for l in range(cfg.num_layers):
    moe = clamped[f"layers_{l}"]["moe"]
    for c_idx, code in enumerate(choices):
      errs = []
      for name in ("w_in", "w_gate", "w_out"):
        w = moe[name]
        wq = np.asarray(quantize_dequantize(w, np.full((cfg.num_experts,), code), cfg.quant.spec(),
                                            moe[name + "_clip"]))
        errs.append(((wq - w) ** 2).sum(axis=(1, 2)) / (w * w).sum(axis=(1, 2)))
      np.testing.assert_allclose(got[l, :, c_idx], np.mean(errs, axis=0), rtol=1e-6)
  # A teacher (no clip params) under the same rules uses ratio 1, as a fresh student would.
  teacher = {k: ({**v, "moe": {n: a for n, a in v["moe"].items() if not n.endswith("_clip")}}
                 if k.startswith("layers_") else v) for k, v in raw_params.items()}
  fresh = quant_error_table(teacher, cfg, choices)
  ones = jax.tree_util.tree_map_with_path(
      lambda path, x: np.ones_like(x) if path[-1].key.endswith("_clip") else x, raw_params)
  np.testing.assert_allclose(fresh, quant_error_table(ones, cfg, choices), rtol=1e-6)


def test_learned_scale_range_and_export_of_ternary_ratios():
  """learn_scale: the same params hold LSQ scale ratios in [0.05, 4]; export (one reader,
  quant.clip.learned_ratio) dequantizes ternary experts with them too, above 1 included."""
  from moeqjax.convert.student_weights import ParamWeights
  rules = QuantRules(expert_code=1, learn_scale=True)
  np.testing.assert_array_equal(effective_clip_ratio(RAW, rules.spec()),
                                np.clip(RAW, 0.05, 4.0))
  cfg = tiny_model_config(quant=rules)
  _, params, quant = init_model(cfg, jax.random.key(0))
  moe = jax.tree.map(np.asarray, params)["layers_0"]["moe"]
  moe["w_in_clip"] = np.random.default_rng(2).uniform(0.8, 5.0, moe["w_in_clip"].shape).astype(
      np.float32)
  params = {**params, "layers_0": {**params["layers_0"], "moe": moe}}
  codes = quant["layers_0"]["moe"]["expert_bits"]  # ternary everywhere
  got = ParamWeights(cfg, params, quant).dequantized(("layers_0", "moe", "w_in"))
  want = quantize_dequantize(moe["w_in"], codes, rules.spec(), np.minimum(moe["w_in_clip"], 4.0))
  np.testing.assert_array_equal(got, np.asarray(want))
  absmean = quantize_dequantize(moe["w_in"], codes, rules.spec())
  assert np.abs(got - np.asarray(absmean)).max() > 1e-3  # the learned ternary scale is used
