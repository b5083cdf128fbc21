"""Per-projection expert codes [L, 3, E]: fake quant, ratios, memory, packing and the packed forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.eval.memory_report import expert_shapes, model_memory
from moeqjax.model import (MoETransformer, QuantRules, default_quant, expert_codes, init_model,
                           init_ratios, set_expert_codes)
from moeqjax.model.projection_codes import PROJECTIONS, by_projection, collapse, layer_codes
from moeqjax.quant import quantize_dequantize, weight_bytes
from moeqjax.serve import load_packed, pack
from moeqjax.serve.packed_source import PackedWeights

# [L, 3, E]: rows w_gate, w_in, w_out; every code, and each projection differs from the others.
PER_PROJECTION = [[[1, 2, 4, 8], [4, 4, 1, 2], [8, 1, 3, 4]],
                  [[2, 2, 2, 2], [1, 1, 1, 1], [4, 8, 4, 8]]]


def _tokens(batch=2, seq=12, seed=1):
  return jnp.asarray(np.random.RandomState(seed).randint(0, 64, (batch, seq)), jnp.int32)


def _student(rules=None, codes=PER_PROJECTION):
  cfg = tiny_model_config(quant=rules or QuantRules(expert_code=1, granularity="channel"))
  _, params, _ = init_model(cfg, jax.random.key(0))
  quant = set_expert_codes(default_quant(cfg), codes)
  return cfg, params, quant


def test_codes_in_and_out_and_bad_shapes():
  cfg, _, quant = _student()
  np.testing.assert_array_equal(expert_codes(quant, cfg.num_layers), PER_PROJECTION)
  flat = set_expert_codes(quant, [[1, 2, 3, 4], [8, 8, 1, 1]])
  assert expert_codes(flat, 2).shape == (2, 4)
  for bad in ([[1, 2, 3], [1, 2, 3]], np.ones((2, 2, 4), int), np.ones((3, 4), int)):
    with pytest.raises(ValueError, match="num_layers, 3, num_experts"):
      set_expert_codes(quant, bad)
  codes = np.asarray(PER_PROJECTION)
  assert [layer_codes(codes[1], n).tolist() for n in PROJECTIONS] == PER_PROJECTION[1]
  assert layer_codes(codes[1, 0], "w_out").tolist() == [2, 2, 2, 2]  # [E]: all projections
  np.testing.assert_array_equal(by_projection(codes)["w_out"], codes[:, 2])
  assert collapse(np.repeat(codes[:, :1], 3, axis=1)).shape == (2, 4)
  assert collapse(codes).shape == (2, 3, 4)


def test_each_projection_is_quantized_at_its_own_codes():
  cfg, params, quant = _student()
  spec = cfg.quant.spec()
  model = MoETransformer(cfg)
  toks = _tokens()
  got = np.asarray(model.apply({"params": params, "quant": quant}, toks))
  # Oracle: the teacher path (no quant collection) on weights quantized per projection by hand.
  manual = jax.tree.map(lambda x: x, params)
  for l in range(cfg.num_layers):
    moe = dict(manual[f"layers_{l}"]["moe"])
    for p, name in enumerate(PROJECTIONS):
      moe[name] = quantize_dequantize(moe[name], np.asarray(PER_PROJECTION[l][p]), spec)
    manual[f"layers_{l}"] = dict(manual[f"layers_{l}"], moe=moe)
  want = np.asarray(model.apply({"params": manual}, toks))
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  # Not vacuous: the [E] form with the w_in row for every projection computes something else.
  as_e = set_expert_codes(quant, np.asarray(PER_PROJECTION)[:, 1])
  other = np.asarray(model.apply({"params": params, "quant": as_e}, toks))
  assert np.abs(other - got).max() > 1e-3


def test_three_equal_rows_equal_the_per_expert_form():
  cfg, params, _ = _student()
  codes_LxE = np.asarray([[1, 2, 3, 4], [8, 1, 4, 2]])
  model = MoETransformer(cfg)
  a = model.apply({"params": params, "quant": set_expert_codes(default_quant(cfg), codes_LxE)},
                  _tokens())
  same = np.repeat(codes_LxE[:, None], 3, axis=1)
  b = model.apply({"params": params, "quant": set_expert_codes(default_quant(cfg), same)},
                  _tokens())
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learned_ratios_start_at_each_projections_code():
  rules = QuantRules(expert_code=1, granularity="channel", learn_clip=True, scale_init="mse")
  cfg, params, quant = _student(rules)
  got = init_ratios(cfg, params, quant)["layers_0"]["moe"]
  from moeqjax.model.ratios import initial_ratio
  for p, name in enumerate(PROJECTIONS):
    want = initial_ratio(params["layers_0"]["moe"][name], np.asarray(PER_PROJECTION[0][p]),
                         cfg.quant.spec())
    np.testing.assert_array_equal(np.asarray(got[name + "_clip"]), np.asarray(want))


def test_memory_counts_each_projection_at_its_code():
  cfg, params, quant = _student()
  spec, shapes = cfg.quant.spec(), expert_shapes(cfg)
  want = sum(weight_bytes(shapes[name], c, spec) for l in range(2)
             for p, name in enumerate(PROJECTIONS) for c in PER_PROJECTION[l][p])
  mem = model_memory(cfg, params, quant)
  assert mem["expert_bytes"] == want
  flat = model_memory(cfg, params, set_expert_codes(quant, np.asarray(PER_PROJECTION)[:, 1]))
  assert flat["expert_bytes"] != want


def test_pack_keeps_per_projection_codes_and_the_packed_forward_equals_fake_quant(tmp_path):
  cfg, params, quant = _student()
  manifest = pack(cfg, params, quant, tmp_path / "p", fp_dtype="float32")
  assert manifest["expert_codes"] == PER_PROJECTION
  assert manifest["bytes"]["expert_tensors_on_disk"] == model_memory(cfg, params,
                                                                     quant)["expert_bytes"]
  served = load_packed(tmp_path / "p")
  student = MoETransformer(cfg)
  for toks in (_tokens(2, 12), _tokens(1, 1)):  # all experts dequantized; selected ones gathered
    want = np.asarray(student.apply({"params": params, "quant": quant}, toks))
    got = np.asarray(served.model.apply(served.variables, toks))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  weights = PackedWeights(tmp_path / "p")
  for p, name in enumerate(PROJECTIONS):
    path = ("layers_1", "moe", name)
    assert weights.codes(path).tolist() == PER_PROJECTION[1][p]
    np.testing.assert_array_equal(
        weights.dequantized(path),
        np.asarray(quantize_dequantize(params["layers_1"]["moe"][name],
                                       np.asarray(PER_PROJECTION[1][p]), cfg.quant.spec())))


def test_pack_of_equal_rows_writes_the_per_expert_manifest(tmp_path):
  cfg, params, _ = _student()
  codes_LxE = [[1, 2, 3, 4], [8, 1, 4, 2]]
  same = np.repeat(np.asarray(codes_LxE)[:, None], 3, axis=1)
  manifest = pack(cfg, params, set_expert_codes(default_quant(cfg), same), tmp_path / "p")
  assert manifest["expert_codes"] == codes_LxE
