"""Packed inference against the fake-quant student (the oracle): logits within 1e-5 in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.model import default_quant, init_ratios, set_expert_codes
from moeqjax.model import MoETransformer, QuantRules, init_model
from moeqjax.serve import load_packed, pack

MIXED = [[1, 2, 3, 4], [8, 1, 1, 4]]  # every code, mixed within a layer


def _student(rules, codes=MIXED, seed=0, **model):
  cfg = tiny_model_config(quant=rules, **model)
  _, params, _ = init_model(cfg, jax.random.key(seed))
  quant = set_expert_codes(default_quant(cfg), codes)
  return cfg, params, quant


def _tokens(batch, seq, seed=1):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 64, (batch, seq)), jnp.int32)


def _check_packed_equals_fake_quant(tmp_path, cfg, params, quant):
  out = tmp_path / "packed"
  pack(cfg, params, quant, out, fp_dtype="float32")
  served = load_packed(out)
  student = MoETransformer(cfg)
  # [2, 12]: 48 (token, expert) pairs >= E, every expert dequantized; [1, 1]: 2 pairs < E, the
  # selected experts gathered from their packed buffers.
  for toks in (_tokens(2, 12), _tokens(1, 1)):
    want = np.asarray(student.apply({"params": params, "quant": quant}, toks))
    got = np.asarray(served.model.apply(served.variables, toks))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    fp = np.asarray(student.apply({"params": params}, toks))
    assert np.abs(fp - want).max() > 1e-3  # the codes matter, so equality is not vacuous
  return served


@pytest.mark.parametrize("granularity,symmetric,method", [
    ("channel", True, "absmean"), ("group", True, "twn"), ("channel", False, "twn"),
    ("group", False, "absmean")])
def test_packed_logits_equal_fake_quant(tmp_path, granularity, symmetric, method):
  rules = QuantRules(expert_code=4, granularity=granularity, group_size=8, symmetric=symmetric,
                     ternary_method=method)
  cfg, params, quant = _student(rules)
  _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)


def test_one_code_per_layer_packed_logits_equal_fake_quant(tmp_path):
  codes = [[1] * 4, [3] * 4]  # one buffer per layer: no per-expert selection between codes
  cfg, params, quant = _student(QuantRules(expert_code=1), codes=codes)
  served = _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)
  assert served.manifest["expert_codes"] == codes
  bank = served.variables["packed"]["layers_1"]["moe"]["w_out"]
  assert set(bank["present"]) == {"int3"}
  assert bank["values"].shape == (4 * 32 * 16 * 3 // 8,)  # 4 int3 experts of 32 x 16, back to back
  np.testing.assert_array_equal(bank["offset"], np.arange(4) * 32 * 16 * 3 // 8)


def test_quantized_attention_router_lm_head_and_shared_expert(tmp_path):
  rules = QuantRules(expert_code=4, attn_code=8, shared_code=3, router_code=8, lm_head_code=4,
                     granularity="group", group_size=8, symmetric=False)
  cfg, params, quant = _student(rules, shared_d_ff=24, shared_expert_gate=True, attn_bias=True)
  served = _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)
  packed = served.variables["packed"]["layers_0"]
  assert set(packed["attn"]["q_proj"]["kernel"]) == {"int8"}
  assert set(packed["moe"]["shared_expert"]["down_proj"]["kernel"]) == {"int3"}
  assert "kernel" not in served.variables["params"]["layers_0"]["attn"]["q_proj"]
  assert "bias" in served.variables["params"]["layers_0"]["attn"]["q_proj"]


def test_int8_activations_on_packed_matmuls(tmp_path):
  """W*A8: packed experts and matrices quantize their inputs exactly as the student does."""
  rules = QuantRules(expert_code=4, attn_code=8, act_bits=8)
  cfg, params, quant = _student(rules, codes=[[1, 2, 4, 8], [4, 4, 3, 1]])
  _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)


def test_base3_ternary_and_float32_scales(tmp_path):
  rules = QuantRules(expert_code=1, ternary_packing="base3", scale_bytes=4)
  cfg, params, quant = _student(rules, codes=[[1, 1, 2, 1], [1, 4, 1, 1]])
  served = _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)
  assert served.manifest["scale_dtype"] == "float32"


def test_learned_clip_ratios_are_folded_into_the_scales(tmp_path):
  rules = QuantRules(expert_code=3, learn_clip=True)
  cfg, params, quant = _student(rules, codes=[[3, 2, 4, 8], [2, 2, 3, 1]])
  rng = np.random.RandomState(3)
  for i in range(cfg.num_layers):
    moe = params[f"layers_{i}"]["moe"]
    for name in ("w_in_clip", "w_gate_clip", "w_out_clip"):
      moe[name] = jnp.asarray(rng.uniform(0.5, 1.2, moe[name].shape), jnp.float32)  # some > 1
  served = _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)
  assert not any("clip" in name for name in served.manifest["tensors"])


def test_learned_scales_are_folded_into_the_scales(tmp_path):
  """learn_scale: per-group ratios (MSE-initialised, then moved; ternary ones above 1, some raw
  values past the range) are what packing stores, so packed logits equal the student's."""
  rules = QuantRules(expert_code=1, learn_scale=True, scale_init="mse", granularity="group",
                     group_size=8)
  cfg, params, quant = _student(rules)
  params = init_ratios(cfg, params, quant)
  rng = np.random.RandomState(4)
  for i in range(cfg.num_layers):
    moe = params[f"layers_{i}"]["moe"]
    for name in ("w_in_clip", "w_gate_clip", "w_out_clip"):
      assert moe[name].shape == moe[name[:-5]].shape[:1] + (moe[name[:-5]].shape[1] // 8,
                                                           moe[name[:-5]].shape[2])
      moe[name] = moe[name] * jnp.asarray(rng.uniform(0.8, 1.25, moe[name].shape), jnp.float32)
    moe["w_in_clip"] = moe["w_in_clip"].at[0, 0, 0].set(5.0)  # beyond SCALE_MAX: clamped to 4
  assert float(params["layers_0"]["moe"]["w_in_clip"][0].max()) > 1.0  # a ternary ratio above 1
  _check_packed_equals_fake_quant(tmp_path, cfg, params, quant)


def test_pack_refuses_full_precision_codes(tmp_path):
  from moeqjax.serve import PackedCheckpointError
  cfg, params, quant = _student(QuantRules(expert_code=4, attn_code=8), codes=[[4, 0, 4, 4],
                                                                             [4, 4, 4, 4]])
  with pytest.raises(PackedCheckpointError, match=r"layers_0/moe/w_\w+: expert\(s\) \[1\] have code 0"):
    pack(cfg, params, quant, tmp_path / "a")
  quant = set_expert_codes(quant, [[4] * 4] * 2)
  quant["layers_1"]["attn"]["o_proj"]["bits"] = jnp.asarray(0, jnp.int32)
  with pytest.raises(PackedCheckpointError, match="layers_1/attn/o_proj/kernel has code 0"):
    pack(cfg, params, quant, tmp_path / "b")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  assert not list(tmp_path.glob(".*packing*"))  # no half-written folder left behind


def test_expert_bank_reads_each_expert_at_its_own_offset():
  """A mixed layer's bank: narrowest code first, widest last, so a fixed-width read never overruns."""
  from moeqjax.quant.packed_tensor import expert_bank, pack_experts
  from moeqjax.quant import QuantSpec
  spec = QuantSpec()
  w = np.random.RandomState(0).randn(5, 16, 8).astype(np.float32)
  codes = np.array([8, 1, 3, 1, 8])
  bank = expert_bank(pack_experts(w, codes, spec), spec, (16, 8))
  width = {1: 16 * 8 // 4, 3: 16 * 8 * 3 // 8, 8: 16 * 8}
  assert list(bank["present"]) == ["ternary", "int3", "int8"]
  np.testing.assert_array_equal(bank["offset"], [2 * width[1] + width[3], 0, 2 * width[1],
                                                 width[1], 2 * width[1] + width[3] + width[8]])
  assert bank["values"].size == sum(width[c] for c in codes.tolist())
  assert int(bank["offset"].max()) + width[8] == bank["values"].size
