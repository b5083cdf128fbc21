"""GPTQ calibration on a Switch Transformer: the per-expert Hessians of every sparse layer (encoder and
decoder) against a numpy oracle built from the forward's MoE inputs, its top-1 routing and the
capacity rule, itself checked by recomputing the MoE outputs the forward returns; padding positions
(the source's and the target's) do not count."""

import jax
import numpy as np

from moeqjax.model import QuantRules
from moeqjax.model.switch import SwitchTransformer
from moeqjax.pipeline.ptq_calib import CalibBatch, model_hessians

from switch_student import ids, switch_cfg, switch_student

CAPACITY = 3  # per sequence and expert: drops tokens at 8 encoder / 6 decoder positions, 4 experts


def _forward(cfg, params, enc, dec, enc_mask):
  """The MoE inputs (the mlp_norm outputs) and the aux the model returns, per stack."""
  model = SwitchTransformer(cfg)
  (_, aux), state = jax.jit(lambda p, e, d, m: model.apply(
      {"params": p}, e, d, m, mutable=["intermediates"],
      capture_intermediates=lambda m, name: m.name == "mlp_norm" and name == "__call__"))(
          params, enc, dec, enc_mask)
  inter = state["intermediates"]
  return {s: np.asarray(inter[s]["layers_0"]["mlp_norm"]["__call__"][0], np.float64)
          for s in ("encoder", "decoder")}, jax.device_get(aux)


def _kept(idx_BxS, num_experts):
  """bool [B, S]: Switch's capacity rule, per sequence, earlier tokens first."""
  keep = np.zeros(idx_BxS.shape, bool)
  for b, row in enumerate(idx_BxS):
    seen = np.zeros(num_experts, int)
    for s, e in enumerate(row):
      keep[b, s] = seen[e] < CAPACITY
      seen[e] += 1
  return keep


def test_switch_hessians_match_a_numpy_oracle():
  cfg = switch_cfg(QuantRules(expert_code=1), expert_capacity=CAPACITY)
  params, _ = switch_student(cfg, seed=3)
  batches = [(ids(2, 8, seed=10 + i), ids(2, 6, seed=20 + i)) for i in range(2)]
  # The second batch is padded: row 0's source has 3 pad positions, row 1's target 2.
  enc_mask = [np.ones((2, 8), bool), np.arange(8)[None, :] < np.array([[5], [8]])]
  target_mask = [np.ones((2, 6), bool), np.arange(6)[None, :] < np.array([[6], [4]])]
  e_num = cfg.num_experts
  sums = {s: [np.zeros((e_num, 16, 16)), np.zeros((e_num, 32, 32)), np.zeros(e_num)]
          for s in ("encoder", "decoder")}
  dropped = padded = 0
  for (enc, dec), counted in zip(batches, zip(enc_mask, target_mask)):
    x_in, aux = _forward(cfg, params, enc, dec, counted[0])
    for s, real in zip(("encoder", "decoder"), counted):
      moe = params[s]["layers_0"]["moe"]
      w_in, w_out = (np.asarray(moe[n], np.float64) for n in ("w_in", "w_out"))
      x_BxSxD = x_in[s]
      b, n, d = x_BxSxD.shape
      idx_BxS = np.asarray(aux[s]["expert_idx"][0]).reshape(b, n)
      gate_BxS = np.asarray(aux[s]["gates"][0], np.float64).reshape(b, n)
      keep = _kept(idx_BxS, e_num)
      dropped += int((~keep).sum())
      # The oracle's inputs and keep rule are the forward's: they reproduce its MoE output.
      y = np.zeros_like(x_BxSxD)
      for bi, si in zip(*np.nonzero(keep)):
        e = idx_BxS[bi, si]
        y[bi, si] = gate_BxS[bi, si] * np.maximum(x_BxSxD[bi, si] @ w_in[e], 0) @ w_out[e]
      np.testing.assert_allclose(y, np.asarray(aux[s]["moe_out"][0]), rtol=1e-4, atol=1e-5)
      padded += int((keep & ~real).sum())
      for bi, si in zip(*np.nonzero(keep & real)):
        e, x = idx_BxS[bi, si], x_BxSxD[bi, si]
        h = np.maximum(x @ w_in[e], 0)
        sums[s][0][e] += np.outer(x, x)
        sums[s][1][e] += np.outer(h, h)
        sums[s][2][e] += 1
  assert dropped > 0 and padded > 0  # dropped and padding tokens exist, and do not count

  calib = [CalibBatch((enc, dec, m), {"encoder": m, "decoder": t})
           for (enc, dec), m, t in zip(batches, enc_mask, target_mask)]
  got = model_hessians(SwitchTransformer(cfg), cfg.moe_config(), params, calib)
  assert got.tokens.shape == (2, e_num)  # encoder's sparse layer, then the decoder's
  for row, s in enumerate(("encoder", "decoder")):
    s_in, s_out, count = sums[s]
    np.testing.assert_array_equal(got.tokens[row], count)
    n = np.maximum(count, 1)[:, None, None]
    np.testing.assert_allclose(got.h_in[row], 2 * s_in / n, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.h_out[row], 2 * s_out / n, rtol=1e-4, atol=1e-5)
  assert got.tokens.sum() == 2 * 2 * (8 + 6) - dropped - padded
