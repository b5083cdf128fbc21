"""W*A8: int8 activation fake quantization only on the inputs of quantized experts and projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import expert_inputs, tiny_model_config
from moeqjax.model import set_expert_codes
from moeqjax.model import MoETransformer, QuantRules, init_model
from moeqjax.model.dispatch import dense_experts, ragged_experts
from moeqjax.quant import quantize_act_int8

MIXED = [[0, 4, 0, 1], [4, 0, 8, 0]]  # per layer, per expert; code 0 = full precision


@pytest.mark.parametrize("dispatch", [dense_experts, ragged_experts])
def test_dispatch_gives_each_expert_its_own_input(dispatch):
  """Issue 11 defect 5a: experts flagged full precision see x, the others see the int8 x_q.

  Oracle: the same dispatch run twice, once on x with only the full-precision experts' gates and
  once on x_q with only the quantized experts' gates; the per-expert outputs add up.
  """
  x, w_in, w_gate, w_out, gates, idx = expert_inputs()
  x_q = quantize_act_int8(x)
  quant_E = jnp.asarray([False, True, False, True])
  got = dispatch(x, w_in, w_gate, w_out, gates, idx, x_q_TxD=x_q, act_quant_E=quant_E)
  on_q = quant_E[idx]
  want = (dispatch(x, w_in, w_gate, w_out, jnp.where(on_q, 0.0, gates), idx)
          + dispatch(x_q, w_in, w_gate, w_out, jnp.where(on_q, gates, 0.0), idx))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  plain = dispatch(x, w_in, w_gate, w_out, gates, idx)
  assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-4  # x_q is really used


def _logits(cfg, params, quant, tokens, dispatch):
  return MoETransformer(cfg.replace(dispatch=dispatch)).apply({"params": params, "quant": quant},
                                                             tokens)


@pytest.mark.parametrize("dispatch", ["ragged", "dense"])
def test_full_precision_experts_skip_act_quant(tokens, dispatch):
  """Issue 11 defect 5a: with act_bits=8 and every expert at code 0, the student is the teacher.

  Before the fix the MoE quantized every expert's input once any codes were present.
  """
  cfg = tiny_model_config(quant=QuantRules(expert_code=4, act_bits=8), dispatch=dispatch)
  model, params, quant = init_model(cfg, jax.random.key(0))
  all_fp = set_expert_codes(quant, np.zeros((2, 4), np.int32))
  student = model.apply({"params": params, "quant": all_fp}, tokens)
  np.testing.assert_array_equal(np.asarray(student),
                                np.asarray(model.apply({"params": params}, tokens)))


def test_mixed_codes_dense_and_ragged_agree_with_act_quant(tokens):
  """Issue 11 defect 5a: per-expert act quant gives the same model under both dispatch paths."""
  cfg = tiny_model_config(quant=QuantRules(expert_code=4, act_bits=8))
  _, params, quant = init_model(cfg, jax.random.key(1))
  mixed = set_expert_codes(quant, np.asarray(MIXED, np.int32))
  dense = np.asarray(_logits(cfg, params, mixed, tokens, "dense"))
  ragged = np.asarray(_logits(cfg, params, mixed, tokens, "ragged"))
  np.testing.assert_allclose(ragged, dense, rtol=1e-5, atol=1e-5)
  # Act quant is live on the quantized experts: switching it off changes the logits.
  no_act = cfg.replace(quant=QuantRules(expert_code=4, act_bits=0))
  assert np.abs(np.asarray(_logits(no_act, params, mixed, tokens, "dense")) - dense).max() > 1e-4
