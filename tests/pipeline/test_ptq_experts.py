"""gptq_experts: an expert without calibration tokens is rounded to nearest, a singular Hessian is damped more."""

import dataclasses

import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.model.config import QuantRules
from moeqjax.pipeline.ptq import gptq_experts
from moeqjax.pipeline.ptq_calib import ExpertHessians
from moeqjax.quant import gptq as gq
from moeqjax.quant import quantize_dequantize, quantize_to_ints


@pytest.mark.parametrize("scale_init", ["absmax", "mse"])
def test_no_token_expert_is_rtn_and_singular_hessian_is_damped(capsys, scale_init):
  cfg = tiny_model_config(num_layers=1, quant=QuantRules(expert_code=1, granularity="channel",
                                                         scale_init=scale_init, stored_ratio=True))
  e, d, f = cfg.num_experts, cfg.d_model, cfg.d_ff
  r = np.random.default_rng(0)
  params = {"layers_0": {"moe": {"w_in": r.normal(size=(e, d, f)).astype(np.float32),
                                 "w_gate": r.normal(size=(e, d, f)).astype(np.float32),
                                 "w_out": r.normal(size=(e, f, d)).astype(np.float32)},
                         "other": np.ones(3, np.float32)}}
  x, h_act = r.normal(size=(e, 64, d)), r.normal(size=(e, 64, f))
  h_in, h_out = np.einsum("eni,enj->eij", x, x), np.einsum("eni,enj->eij", h_act, h_act)
  h_in[1] = np.outer(x[1, 0], x[1, 0])  # rank one: not positive definite without damping
  tokens = np.array([[64, 64, 0, 64]])  # expert 2 got no tokens
  codes = np.array([[1, 2, 4, 1]], np.int32)
  new, report = gptq_experts(cfg, params, ExpertHessians([h_in], [h_out], tokens), codes, damp=0.0)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 2 and "(0, 2)" in err[0] and "rounded to nearest" in err[0]
  assert "(0, 1, w_in/w_gate: 0.01)" in err[1] and "w_out" not in err[1]
  assert report["rtn_fallback_no_tokens"] == [[0, 2]]
  assert report["scale_init"] == scale_init and 0.0 <= report["mse_grid_columns"] <= 1.0
  spec = cfg.quant.spec()
  for name in ("w_in", "w_gate", "w_out"):
    w = params["layers_0"]["moe"][name]
    eye = np.broadcast_to(np.eye(w.shape[1], dtype=np.float32), (e,) + (w.shape[1],) * 2)
    rtn = np.asarray(gq.gptq(w, eye, codes[0], spec, h=eye).w_hat)  # RTN on GPTQ's grid
    moe = new["layers_0"]["moe"]
    got = np.asarray(quantize_dequantize(moe[name], codes[0], spec, moe[name + "_clip"]))
    np.testing.assert_array_equal(got[2], rtn[2])  # no tokens: H = I, which is RTN
    assert not np.array_equal(got[0], rtn[0])  # a calibrated expert moved off RTN
    q_int = quantize_to_ints(moe[name], codes[0], spec, moe[name + "_clip"])[0]
    assert q_int[1].min() == -2  # int2 on its 2^b levels {-2, -1, 0, 1}
  assert new["layers_0"]["other"] is params["layers_0"]["other"]
  with pytest.raises(ValueError, match="stored_ratio=True"):
    gptq_experts(dataclasses.replace(cfg, quant=QuantRules(expert_code=1)), params,
                 ExpertHessians([h_in], [h_out], tokens), codes)


def test_stored_ratio_gets_no_gradient_and_the_weight_a_plain_ste():
  """Under quant.stored_ratio the experts' forward uses the ratio (GPTQ's scale), the ratio gets no
  gradient (so QAT from a GPTQ student keeps it) and the weight's gradient is not clipped."""
  import jax
  import jax.numpy as jnp
  from moeqjax.model.moe import _fixed_ratio_quant
  spec = QuantRules(expert_code=2, stored_ratio=True).spec()
  w = jnp.asarray(np.random.default_rng(3).normal(size=(2, 8, 4)), jnp.float32)
  codes = jnp.array([2, 3], jnp.int32)
  ratio = jnp.full((2, 1, 4), 0.5, jnp.float32)
  np.testing.assert_array_equal(_fixed_ratio_quant(w, codes, spec, ratio),
                                quantize_dequantize(w, codes, spec, ratio))
  probe = jnp.asarray(np.random.default_rng(4).normal(size=w.shape), jnp.float32)
  g_w, g_r = jax.grad(lambda a, r: jnp.sum(probe * _fixed_ratio_quant(a, codes, spec, r)),
                      argnums=(0, 1))(w, ratio)
  np.testing.assert_array_equal(g_w, probe)  # ratio 0.5 clips some weights; learn_clip would zero them
  np.testing.assert_array_equal(g_r, 0.0)
