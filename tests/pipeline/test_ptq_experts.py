"""gptq_experts: an expert without calibration tokens is rounded to nearest, a singular Hessian is damped more."""

import numpy as np

from conftest import tiny_model_config
from moeqjax.pipeline.ptq import gptq_experts
from moeqjax.pipeline.ptq_calib import ExpertHessians
from moeqjax.quant import quantize_dequantize


def test_no_token_expert_is_rtn_and_singular_hessian_is_damped(capsys):
  cfg = tiny_model_config(num_layers=1)
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
  spec = cfg.quant.spec()
  for name in ("w_in", "w_gate", "w_out"):
    rtn = np.asarray(quantize_dequantize(params["layers_0"]["moe"][name], codes[0], spec))
    got = np.asarray(quantize_dequantize(new["layers_0"]["moe"][name], codes[0], spec))
    np.testing.assert_array_equal(got[2], rtn[2])  # no tokens: H = I, which is RTN
    assert not np.array_equal(got[0], rtn[0])  # a calibrated expert moved off RTN
  assert new["layers_0"]["other"] is params["layers_0"]["other"]
