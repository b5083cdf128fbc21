"""Grouped (ragged_dot) vs dense MoE dispatch: forward and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import expert_inputs, tiny_model_config
from moeqjax.model import MoETransformer, init_model
from moeqjax.model.dispatch import dense_experts, gathered_experts, ragged_experts
from moeqjax.model.expert_parallel import expert_parallel_experts


def _loop_oracle(x, w_in, w_gate, w_out, gates, idx):
  """Per token, per chosen expert, in plain numpy."""
  x, w_in, w_gate, w_out = map(np.asarray, (x, w_in, w_gate, w_out))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j, e in enumerate(np.asarray(idx[t])):
      g = x[t] @ w_gate[e]
      h = g / (1 + np.exp(-g)) * (x[t] @ w_in[e])
      out[t] += float(gates[t, j]) * (h @ w_out[e])
  return out


def test_ragged_and_dense_match_loop_oracle():
  args = expert_inputs()
  oracle = _loop_oracle(*args)
  np.testing.assert_allclose(ragged_experts(*args), oracle, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dense_experts(*args), oracle, rtol=1e-5, atol=1e-5)


def test_gathered_experts_match_loop_oracle():
  """The decode path: each (token, slot) pair with its own gathered expert weights."""
  x, w_in, w_gate, w_out, gates, idx = expert_inputs(seed=2, t=3)
  take = lambda w: jnp.take(w, idx.reshape(-1), axis=0)
  got = gathered_experts(x, take(w_in), take(w_gate), take(w_out), gates)
  np.testing.assert_allclose(got, _loop_oracle(x, w_in, w_gate, w_out, gates, idx), rtol=1e-5,
                             atol=1e-5)


def test_full_precision_decode_size_forward_equals_grouped(tiny_cfg):
  """One token (2 pairs < 4 experts) takes the gathered path; a 3-token forward (6 pairs, the
  grouped path) gives the same logits at its first position, since the model is causal."""
  _, params, _ = init_model(tiny_cfg, jax.random.key(0))
  toks = jnp.asarray([[5, 9, 2]], jnp.int32)
  model = MoETransformer(tiny_cfg)
  got = model.apply({"params": params}, toks[:, :1])
  want = model.apply({"params": params}, toks)[:, :1]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_expert_parallel_without_an_expert_axis_is_ragged():
  """model.dispatch="ep" off a mesh (or on one whose expert axis is 1) is the one-shard grouped
  matmul, so one config runs on a laptop and on a pod; on a mesh it is tested against the dense
  oracle in tests/train/test_mesh_step.py."""
  args = expert_inputs(seed=3)
  np.testing.assert_array_equal(expert_parallel_experts(*args), ragged_experts(*args))


def test_ragged_handles_empty_experts():
  x, w_in, w_gate, w_out, gates, _ = expert_inputs(seed=1)
  idx = jnp.tile(jnp.asarray([[0, 2]], jnp.int32), (x.shape[0], 1))  # experts 1 and 3 get nothing
  np.testing.assert_allclose(ragged_experts(x, w_in, w_gate, w_out, gates, idx),
                             dense_experts(x, w_in, w_gate, w_out, gates, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_model_grouped_vs_dense_forward_and_grads(tokens, quantized):
  cfg = tiny_model_config()
  _, params, quant = init_model(cfg, jax.random.key(3))
  variables = {"params": params, **({"quant": quant} if quantized else {})}

  def loss(p, dispatch):
    v = dict(variables, params=p)
    logits = MoETransformer(cfg.replace(dispatch=dispatch)).apply(v, tokens)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  l_r, g_r = jax.value_and_grad(loss)(params, "ragged")
  l_d, g_d = jax.value_and_grad(loss)(params, "dense")
  np.testing.assert_allclose(l_r, l_d, rtol=1e-5)
  flat_r, flat_d = jax.tree.leaves(g_r), jax.tree.leaves(g_d)
  assert len(flat_r) == len(flat_d)
  for a, b in zip(flat_r, flat_d):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the router must receive gradient through the gates in both paths
  assert float(jnp.abs(g_r["layers_0"]["moe"]["router"]["kernel"]).sum()) > 0
