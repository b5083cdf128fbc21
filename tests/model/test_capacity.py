"""Expert capacity (model.capacity_factor): the per-sequence, top-1-first drop rule against a
brute-force loop, its independence of the batch, every dispatch against the per-token loop oracle on
the kept pairs, and train/drop_rate in the train step."""

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


def _keep_flat(idx_TxK, num_experts, factor, seq_len):
  """capacity_keep on [T, K] pairs read as T / seq_len sequences."""
  t, k = idx_TxK.shape
  return capacity_keep(jnp.asarray(idx_TxK).reshape(t // seq_len, seq_len, k), num_experts,
                       capacity_factor=factor).reshape(t, k)


@pytest.mark.parametrize("factor", [0.3, 0.8, 1.0, 1.25, 2.0])
def test_capacity_keep_equals_the_loop(factor):
  for seed, (b, s, e, k) in enumerate([(1, 37, 4, 2), (2, 8, 8, 1), (3, 3, 8, 3), (4, 9, 4, 2)]):
    idx = skewed_idx(seed, b * s, e, k).reshape(b, s, k)
    want = reference_keep(idx, e, factor)
    np.testing.assert_array_equal(capacity_keep(jnp.asarray(idx), e, capacity_factor=factor), want)
    if factor <= 1.0 and s * k > e:
      assert not want.all()  # the skewed routing overflows expert 0


def test_a_fixed_capacity_keeps_each_sequences_first_tokens():
  """capacity=c (Hugging Face Switch's expert_capacity): with top-1 each expert keeps the first c
  tokens of every sequence routed to it, whatever the factor says."""
  idx = skewed_idx(7, 2 * 10, 4, 1).reshape(2, 10, 1)
  for cap in (1, 2, 3):
    got = np.asarray(capacity_keep(jnp.asarray(idx), 4, capacity_factor=9.0, capacity=cap))
    np.testing.assert_array_equal(got, reference_keep(idx, 4, 0.0, capacity=cap))
    for b in range(2):
      for e in range(4):
        mine = idx[b, :, 0] == e
        assert got[b, :, 0][mine].tolist() == [i < cap for i in range(mine.sum())]


def test_a_sequences_drops_do_not_depend_on_the_other_rows():
  """The same sequence alone, first or last in a batch, next to any other rows: the same drops."""
  e, k, s = 4, 2, 12
  rows = skewed_idx(11, 5 * s, e, k).reshape(5, s, k)
  alone = np.asarray(capacity_keep(jnp.asarray(rows[:1]), e, capacity_factor=0.75))[0]
  assert not alone.all()
  for batch in (rows, rows[::-1], rows[[0, 0, 3]], np.concatenate([rows[2:], rows[:1]])):
    keep = np.asarray(capacity_keep(jnp.asarray(batch), e, capacity_factor=0.75))
    for b in range(len(batch)):
      if np.array_equal(batch[b], rows[0]):
        np.testing.assert_array_equal(keep[b], alone)


def test_first_choices_are_kept_before_any_second_choice():
  """Expert 0 is every token's 2nd choice and token 5's 1st: the capacity goes to token 5's 1st
  choice, then to 2nd choices in token order."""
  s, e = 6, 4
  idx = np.stack([np.full(s, 1), np.zeros(s, int)], axis=-1)  # 1st: expert 1, 2nd: expert 0
  idx[5] = [0, 2]
  keep = np.asarray(capacity_keep(jnp.asarray(idx[None]), e, capacity=2))[0]
  assert keep[5, 0]  # the only 1st choice of expert 0 is kept although it comes last
  assert keep[:, 1].tolist() == [True, False, False, False, False, True]  # token 5's 2nd: expert 2
  np.testing.assert_array_equal(keep, reference_keep(idx[None], e, 0.0, capacity=2)[0])
  # Expert 1 is every 1st choice but token 5's: the first two tokens keep it.
  assert keep[:5, 0].tolist() == [True, True, False, False, False]


def _inputs(factor, t=24, seq_len=12):
  x, w_in, w_gate, w_out, gates, _ = expert_inputs(seed=3, t=t)
  idx = jnp.asarray(skewed_idx(5, t, 4, 2), jnp.int32)
  keep = _keep_flat(idx, 4, factor, seq_len)
  return (x, w_in, w_gate, w_out, gates, idx), keep


def test_every_dispatch_equals_the_oracle_on_the_kept_pairs():
  args, keep = _inputs(0.75)
  x, w_in, w_gate, w_out, gates, idx = args
  ref = reference_keep(idx, 4, 0.75, seq_len=12)
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
  kept = np.asarray(gates) * reference_keep(idx, 4, 0.75, seq_len=12)
  reads_q = np.asarray(act_quant)[np.asarray(idx)]
  oracle = (_loop_oracle(x, w_in, w_gate, w_out, kept * ~reads_q, idx) +
            _loop_oracle(x_q, w_in, w_gate, w_out, kept * reads_q, idx))
  for fn in (ragged_experts, dense_experts):
    y = fn(*args, x_q_TxD=x_q, act_quant_E=act_quant, keep_TxK=keep)
    np.testing.assert_allclose(y, oracle, rtol=1e-5, atol=1e-5, err_msg=fn.__name__)


def test_a_large_capacity_drops_nothing_and_equals_dropless():
  args, keep = _inputs(2.0)  # E/k = 2: ceil(2 * S*k / E) = S pairs, all an expert can get
  assert keep.all()
  np.testing.assert_array_equal(ragged_experts(*args, keep_TxK=keep), ragged_experts(*args))


def test_moe_block_drops_by_the_reference_rule():
  """The block computes the keep mask from its own routing and hands it to the dispatch."""
  cfg = tiny_model_config(capacity_factor=0.5)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 16)), jnp.float32)
  params = nn.meta.unbox(jax.jit(MoE(cfg).init)(jax.random.key(1), x))["params"]
  y, aux = jax.jit(lambda p: MoE(cfg).apply({"params": p}, x))(params)
  ref = reference_keep(aux["expert_idx"], 4, 0.5, seq_len=12)
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
  want = np.mean([1 - reference_keep(idx, 4, 0.5, seq_len=12).mean()
                  for idx in np.asarray(aux["expert_idx"])])
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


def test_evaluation_reports_the_drops_whatever_its_batch_size():
  """evaluate_lm's drop_rate is the per-window rule's share (the loop's), equal for every batch
  size since windows are the sequences; the report line names it; dropless gives None."""
  from moeqjax.eval.lm_eval import evaluate_lm
  from moeqjax.eval.report import capacity_note
  cfg = tiny_model_config(capacity_factor=0.5, num_layers=1)
  params, quant = numpy_student(cfg, [[1, 2, 4, 8]])
  windows = np.random.default_rng(3).integers(0, 64, size=(5, 11)).astype(np.int32)
  variables = {"params": params, "quant": quant}
  got = [evaluate_lm(cfg, variables, windows, bs) for bs in (1, 2, 5)]
  want = 1 - reference_keep(got[0]["expert_idx"][0], 4, 0.5, seq_len=10).mean()
  assert want > 0
  for ev in got:
    np.testing.assert_allclose(ev["drop_rate"], want, rtol=1e-6)
  note = capacity_note({"student": {"drop_rate": want}, "teacher": {"drop_rate": None}})
  assert f"student {want:.2%}" in note and "teacher" not in note
  dropless = evaluate_lm(cfg.replace(capacity_factor=0.0), variables, windows, 5)
  assert dropless["drop_rate"] is None and capacity_note({"s": dropless}) is None
