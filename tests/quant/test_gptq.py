"""GPTQ against RTN (identity / diagonal Hessian), a numpy textbook loop, and its output-error property."""

import numpy as np
import pytest

from moeqjax.quant import QuantSpec, quantize_dequantize, quantize_to_ints
from moeqjax.quant import gptq as gq

E, D_IN, D_OUT = 5, 16, 8
CODES = np.array([1, 2, 3, 4, 8], np.int32)
SPECS = {
    "sym_channel_absmean": QuantSpec(granularity="channel"),
    "asym_group_twn": QuantSpec(granularity="group", group_size=8, symmetric=False,
                                ternary_method="twn"),
    "asym_tensor_absmean": QuantSpec(granularity="tensor", symmetric=False),
}


def storable_scale_np(x, spec):
  """fp16 rounding of a scale (capped at the fp16 max), in numpy."""
  assert spec.scale_bytes == 2
  return np.float32(np.float16(min(np.float32(x), 65504.0)))


def _weights(seed):
  return np.random.default_rng(seed).normal(size=(E, D_IN, D_OUT)).astype(np.float32)


def _correlated_x(seed, n=64):
  r = np.random.default_rng(seed)
  mix = r.normal(size=(D_IN, D_IN)) + 2.0 * np.eye(D_IN)
  return (r.normal(size=(E, n, D_IN)) @ mix).astype(np.float32)


def _factors(x, damp=gq.DEFAULT_DAMP):
  h = 2 * np.einsum("eni,enj->eij", x, x) / x.shape[1]
  u, dead, used = gq.inverse_hessian_factor(h, damp)
  return h, np.asarray(u), np.asarray(dead), used


@pytest.mark.parametrize("name", sorted(SPECS))
def test_identity_and_diagonal_hessian_equal_rtn(name):
  spec, w = SPECS[name], _weights(0)
  q_rtn, s_rtn, z_rtn = quantize_to_ints(w, CODES, spec)
  diag = np.random.default_rng(1).uniform(0.5, 3.0, size=(E, D_IN)).astype(np.float32)
  for h in (np.broadcast_to(np.eye(D_IN, dtype=np.float32), (E, D_IN, D_IN)),
            np.einsum("ei,ij->eij", diag, np.eye(D_IN, dtype=np.float32))):
    u, _, _ = gq.inverse_hessian_factor(h)
    res = gq.gptq(w, u, CODES, spec)
    np.testing.assert_array_equal(np.asarray(res.q), q_rtn)
    np.testing.assert_array_equal(np.asarray(res.scale), s_rtn)
    np.testing.assert_array_equal(np.asarray(res.zero_point), 0 if z_rtn is None else z_rtn)
    np.testing.assert_array_equal(np.asarray(res.w_hat), np.asarray(quantize_dequantize(w, CODES, spec)))


def _reference_grid(rows, code, spec):
  """Per output column of one group of rows [R, out]: (scale, zero, divisor, anchors {row: level})."""
  n_out = rows.shape[1]
  cols = [rows.reshape(-1)] if spec.granularity == "tensor" else [rows[:, c] for c in range(n_out)]
  grids = []
  for v in cols:
    if code == 1:
      mean_abs = np.float32(np.mean(np.abs(v)))
      if spec.ternary_method == "absmean":
        grids.append((storable_scale_np(mean_abs, spec), 0.0, mean_abs + np.float32(1e-8), {}))
      else:
        delta = np.float32(0.7) * mean_abs
        kept = np.abs(v) > delta
        alpha = np.float32(np.abs(v)[kept].sum() / max(kept.sum(), 1))
        grids.append((storable_scale_np(alpha, spec), 0.0, delta, {}))
    elif spec.symmetric:
      qmax = 2 ** (code - 1) - 1
      absmax = np.max(np.abs(v))
      s = storable_scale_np(absmax / np.float32(qmax), spec)
      i = int(np.argmax(np.abs(v)))
      grids.append((s, 0.0, s if s > 0 else 1.0, {i: np.sign(v[i]) * qmax} if absmax > 0 else {}))
    else:
      levels = 2 ** code - 1
      lo, hi = min(v.min(), 0.0), max(v.max(), 0.0)
      base = np.float32((hi - lo) / np.float32(levels))
      s = storable_scale_np(base, spec)
      z = np.round(-lo / (base if base > 0 else 1.0))
      anchors = {}
      if v.max() > 0:
        anchors[int(np.argmax(v))] = levels
      if v.min() < 0:
        anchors[int(np.argmin(v))] = 0
      grids.append((s, z, s if s > 0 else 1.0, anchors))
  if spec.granularity == "tensor":  # one grid; element index i is (row i // out, column i % out)
    s, z, div, anchors = grids[0]
    return [(s, z, div, {k // n_out: lvl for k, lvl in anchors.items() if k % n_out == c})
            for c in range(n_out)]
  return grids


def _reference_gptq(w, u, code, spec):
  """The textbook loop, unblocked, one input row at a time, one output column at a time."""
  w = w.astype(np.float32).copy()
  n_in, n_out = w.shape
  glen = spec.group_size if spec.granularity == "group" else n_in
  q = np.zeros_like(w)
  for i in range(n_in):
    if i % glen == 0:
      grids = _reference_grid(w[i:i + glen], code, spec)
    err = np.zeros(n_out, np.float32)
    for c in range(n_out):
      s, z, div, anchors = grids[c]
      x = w[i, c]
      if code == 1 and spec.ternary_method == "absmean":
        level = np.clip(np.round(x / div), -1, 1)
      elif code == 1:
        level = np.sign(x) * (abs(x) > div)
      elif spec.symmetric:
        qmax = 2 ** (code - 1) - 1
        level = anchors.get(i % glen, np.clip(np.round(x / div), -qmax, qmax))
      else:
        level = anchors.get(i % glen, np.clip(np.round(x / div) + z, 0, 2 ** code - 1))
      q[i, c] = level
      err[c] = (x - (level - z) * s) / u[i, i]
    w[i + 1:] -= np.outer(u[i, i + 1:], err)
  return q


@pytest.mark.parametrize("name", sorted(SPECS))
def test_matches_numpy_textbook_loop(name):
  spec, w = SPECS[name], _weights(2)
  _, u, _, _ = _factors(_correlated_x(3))
  # Lazy-batch blocks of 4 rows give the same integers as one block (compiled for two specs only).
  for block in (D_IN, 4) if name != "asym_tensor_absmean" else (D_IN,):
    res = gq.gptq(w, u, CODES, spec, block_size=block)
    for e, code in enumerate(CODES):
      np.testing.assert_array_equal(np.asarray(res.q[e]), _reference_gptq(w[e], u[e], code, spec),
                                    err_msg=f"expert {e} code {code} block {block}")


@pytest.mark.parametrize("name", sorted(SPECS))
def test_output_is_exact_through_the_fake_quantizer(name):
  """quantize_to_ints(exact_latent(...)) gives back GPTQ's integers, scales and zero points."""
  spec, w = SPECS[name], _weights(4)
  _, u, _, _ = _factors(_correlated_x(5))
  res = gq.gptq(w, u, CODES, spec)
  latent = np.asarray(gq.exact_latent(res, CODES, spec))
  q, s, z = quantize_to_ints(latent, CODES, spec)
  np.testing.assert_array_equal(q, np.asarray(res.q))
  np.testing.assert_array_equal(s, np.asarray(res.scale))
  np.testing.assert_array_equal(0 if z is None else z, np.asarray(res.zero_point))
  np.testing.assert_array_equal(np.asarray(quantize_dequantize(latent, CODES, spec)),
                                np.asarray(res.w_hat))


def test_output_error_below_rtn_on_correlated_inputs():
  """||XW - XW_hat||^2 of GPTQ <= RTN's, per code, summed over seeds (a property in expectation)."""
  spec = SPECS["sym_channel_absmean"]
  total = {"gptq": np.zeros(E), "rtn": np.zeros(E)}
  for seed in range(4):
    w, x = _weights(10 + seed), _correlated_x(20 + seed)
    h, u, _, _ = _factors(x)
    res = gq.gptq(w, u, CODES, spec)
    rtn = np.asarray(quantize_dequantize(w, CODES, spec))
    for key, w_q in (("gptq", np.asarray(res.w_hat)), ("rtn", rtn)):
      err = np.einsum("eni,eio->eno", x, w - w_q)
      total[key] += (err ** 2).sum(axis=(1, 2))
  # Every code must win on the sum over seeds (a single seed may lose where rounding is coarse).
  print({k: v.round(1).tolist() for k, v in total.items()})
  assert np.all(total["gptq"] < total["rtn"]), total


def test_damping_grows_on_a_singular_hessian():
  rank_one = np.random.default_rng(6).normal(size=(1, D_IN)).astype(np.float32)
  h = np.stack([rank_one.T @ rank_one, np.eye(D_IN, dtype=np.float32)])
  u, dead, used = gq.inverse_hessian_factor(h, damp=0.0)
  assert used[1] == 0.0 and used[0] > 0.0
  h_damped = h[0] + used[0] * np.mean(np.diag(h[0])) * np.eye(D_IN)
  np.testing.assert_allclose(np.asarray(u[0]).T @ np.asarray(u[0]), np.linalg.inv(h_damped),
                             rtol=1e-4, atol=1e-5)
  assert np.allclose(np.triu(np.asarray(u[0])), np.asarray(u[0]))  # upper triangular
  assert not np.any(np.asarray(dead))


def test_dead_inputs_are_zeroed():
  h = np.broadcast_to(np.eye(D_IN, dtype=np.float32), (E, D_IN, D_IN)).copy()
  h[:, 3, 3] = 0.0
  u, dead, _ = gq.inverse_hessian_factor(h)
  assert np.all(np.asarray(dead)[:, 3]) and np.asarray(dead).sum() == E
  res = gq.gptq(_weights(7), u, CODES, SPECS["sym_channel_absmean"], dead=dead)
  assert np.all(np.asarray(res.w_hat)[:, 3] == 0)
