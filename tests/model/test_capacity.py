"""Expert capacity (model.capacity_factor): the drop rule against a brute-force loop, every dispatch
against the per-token loop oracle on the kept pairs, and train/drop_rate in the train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from capacity_oracle import reference_keep, skewed_idx
from conftest import expert_inputs, numpy_student, tiny_model_config
from moeqjax.model import MoETransformer, forward_with_aux
from moeqjax.model.capacity import capacity_keep
from moeqjax.model.dispatch import dense_experts, gathered_experts, ragged_experts
from moeqjax.model.expert_parallel import expert_parallel_experts
from moeqjax.model.moe import MoE
from moeqjax.pipeline.config import ConfigError, apply_overrides, load_config, model_config
from moeqjax.objectives import LossWeights
from moeqjax.train import OptimConfig, create_state, jit_train_step, make_optimizer
from test_moe_dispatch import _loop_oracle


@pytest.mark.parametrize("factor", [0.3, 0.8, 1.0, 1.25, 2.0])
def test_capacity_keep_equals_the_loop(factor):
  for seed, (t, e, k) in enumerate([(37, 4, 2), (16, 8, 1), (9, 8, 3)]):
    idx = skewed_idx(seed, t, e, k)
    want = reference_keep(idx, e, factor)
    np.testing.assert_array_equal(capacity_keep(jnp.asarray(idx), e, factor), want)
    if factor <= 1.0:
      assert not want.all()  # the skewed routing overflows expert 0


def _inputs(factor, t=24):
  x, w_in, w_gate, w_out, gates, _ = expert_inputs(seed=3, t=t)
  idx = jnp.asarray(skewed_idx(5, t, 4, 2), jnp.int32)
  keep = capacity_keep(idx, 4, factor)
  return (x, w_in, w_gate, w_out, gates, idx), keep


def test_every_dispatch_equals_the_oracle_on_the_kept_pairs():
  args, keep = _inputs(0.75)
  x, w_in, w_gate, w_out, gates, idx = args
  ref = reference_keep(idx, 4, 0.75)
  np.testing.assert_array_equal(keep, ref)
  assert 0 < (~ref).sum() < ref.size
  # The dense MoE on the kept pairs: a dropped pair's gate is zero.
  oracle = _loop_oracle(x, w_in, w_gate, w_out, np.asarray(gates) * ref, idx)
  take = lambda w: jnp.take(w, idx.reshape(-1), axis=0)
  got = {
      "ragged": jax.jit(ragged_experts)(*args, keep_TxK=keep),
      "dense": dense_experts(*args, keep_TxK=keep),
      "ep (no mesh)": expert_parallel_experts(*args, keep_TxK=keep),
      "gathered": gathered_experts(x, take(w_in), take(w_gate), take(w_out), gates, keep),
  }
  for name, y in got.items():
    np.testing.assert_allclose(y, oracle, rtol=1e-5, atol=1e-5, err_msg=name)


def test_dropped_pairs_with_activation_quantized_experts():
  """Experts 0 and 2 read x_q: the oracle splits the gates by which input each pair reads."""
  args, keep = _inputs(0.75)
  x, w_in, w_gate, w_out, gates, idx = args
  x_q = jnp.round(x * 4) / 4
  act_quant = jnp.asarray([True, False, True, False])
  kept = np.asarray(gates) * reference_keep(idx, 4, 0.75)
  reads_q = np.asarray(act_quant)[np.asarray(idx)]
  oracle = (_loop_oracle(x, w_in, w_gate, w_out, kept * ~reads_q, idx) +
            _loop_oracle(x_q, w_in, w_gate, w_out, kept * reads_q, idx))
  for fn in (ragged_experts, dense_experts):
    y = fn(*args, x_q_TxD=x_q, act_quant_E=act_quant, keep_TxK=keep)
    np.testing.assert_allclose(y, oracle, rtol=1e-5, atol=1e-5, err_msg=fn.__name__)


def test_a_large_capacity_drops_nothing_and_equals_dropless():
  args, keep = _inputs(2.0)  # E/k = 2: ceil(2 * T*k / E) = T pairs, all an expert can get
  assert keep.all()
  np.testing.assert_array_equal(ragged_experts(*args, keep_TxK=keep), ragged_experts(*args))


def test_moe_block_drops_by_the_reference_rule():
  """The block computes the keep mask from its own routing and hands it to the dispatch."""
  cfg = tiny_model_config(capacity_factor=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 16)), jnp.float32)
  params = nn.meta.unbox(jax.jit(MoE(cfg).init)(jax.random.key(1), x))["params"]
  y, aux = jax.jit(lambda p: MoE(cfg).apply({"params": p}, x))(params)
  ref = reference_keep(aux["expert_idx"], 4, 0.5)
  assert 0 < (~ref).sum()
  oracle = _loop_oracle(x.reshape(-1, 16), params["w_in"], params["w_gate"], params["w_out"],
                        np.asarray(aux["gates"]) * ref, aux["expert_idx"])
  np.testing.assert_allclose(y.reshape(-1, 16), oracle, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(aux["drop_rate"], 1 - ref.mean(), rtol=1e-6)


def test_train_step_logs_drop_rate_only_with_a_capacity():
  cfg = tiny_model_config(capacity_factor=0.5, num_layers=1)
  model = MoETransformer(cfg)
  params, quant = numpy_student(cfg, [[1, 2, 4, 8]])  # no model init: it costs seconds
  tx = make_optimizer(OptimConfig(1e-3, 0, 2, 0.1, 0.0, 1.0))
  state = create_state(params, tx, cfg.num_layers, quant=quant)
  batch = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 13)), jnp.int32)
  weights = LossWeights()
  # The routing the step sees (its params before the update), then the rule applied to it.
  _, aux = jax.jit(lambda v: forward_with_aux(model, v, batch[:, :-1]))(
      {"params": params, "quant": quant})
  want = np.mean([1 - reference_keep(idx, 4, 0.5).mean() for idx in np.asarray(aux["expert_idx"])])
  assert want > 0
  _, metrics = jit_train_step(model, tx, weights)(state, batch, jax.random.key(0))
  np.testing.assert_allclose(metrics["train/drop_rate"], want, rtol=1e-6)
  # Dropless (the default): no such metric (traced only).
  dropless = MoETransformer(cfg.replace(capacity_factor=0.0))
  _, shapes = jax.eval_shape(jit_train_step(dropless, tx, weights), state, batch, jax.random.key(0))
  assert "train/drop_rate" not in shapes and "train/loss" in shapes


@pytest.mark.parametrize("value", ["-0.5", "nan", "inf"])
def test_bad_capacity_factor_is_one_line(value):
  config = load_config(None)
  apply_overrides(config, {"model.capacity_factor": value})
  with pytest.raises(ConfigError) as err:
    model_config(config)
  assert str(err.value) == (
      f"config section 'model': model.capacity_factor={float(value)} must be a finite number "
      ">= 0 (0 = dropless, the default; e.g. 1.25 drops the overflow)")
