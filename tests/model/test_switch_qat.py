"""QAT of a ternary Switch student: its quant collection, the fake-quant oracle, the seq2seq joint step vs round-to-nearest."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax import quant as q
from moeqjax.data import load_stdlib_corpus
from moeqjax.data.seq2seq import span_corruption_batch, t5_sentinel_ids
from moeqjax.eval import evaluate_seq2seq, seq2seq_routing_agreement
from moeqjax.model import (QuantRules, SwitchConfig, SwitchTransformer, default_quant,
                           expert_codes, init_ratios, init_switch, set_expert_codes)
from moeqjax.objectives import LossWeights
from moeqjax.train import (OptimConfig, batch_arrays, create_state, jit_seq2seq_step,
                           make_optimizer, router_row_norms, seq2seq_losses)


def small_switch(**changes) -> SwitchConfig:
  base = dict(vocab_size=40, d_model=16, d_kv=8, num_heads=2, d_ff=24, num_layers=2,
              num_decoder_layers=3, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
              num_experts=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
              quant=QuantRules(expert_code=1, scale_init="mse"))
  base.update(changes)
  return SwitchConfig(**base)


def _ids(batch, seq, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(2, 40, (batch, seq)), jnp.int32)


# Rows: the encoder's sparse layers 0 and 1, then the decoder's sparse layer 1.
CODES_LxE = [[1, 2, 4, 0], [8, 1, 3, 2], [2, 0, 1, 4]]
ROWS = [("encoder", "layers_0"), ("encoder", "layers_1"), ("decoder", "layers_1")]


def test_switch_codes_are_rows_per_sparse_layer_encoder_first():
  cfg = small_switch()
  quant = default_quant(cfg)
  np.testing.assert_array_equal(expert_codes(quant), np.ones((3, 4), int))
  new = set_expert_codes(quant, CODES_LxE)
  np.testing.assert_array_equal(expert_codes(new), CODES_LxE)
  for row, (stack, layer) in zip(CODES_LxE, ROWS):
    assert new[stack][layer]["moe"]["expert_bits"].tolist() == row
  np.testing.assert_array_equal(expert_codes(quant), np.ones((3, 4), int))  # a copy
  with pytest.raises(ValueError, match=r"needs \[num_layers, num_experts\] = \[3, 4\].*"
                     "encoder/layers_0, encoder/layers_1, decoder/layers_1") as e:
    set_expert_codes(quant, np.ones((2, 4), int))
  assert "\n" not in str(e.value)


def test_fake_quant_forward_equals_experts_quantized_by_hand():
  cfg = small_switch()
  model, params, _ = init_switch(cfg, jax.random.key(1))
  quant = set_expert_codes(default_quant(cfg), CODES_LxE)
  enc, dec = _ids(2, 9, 0), _ids(2, 5, 1)
  apply = jax.jit(lambda v: model.apply(v, enc, dec)[0])
  student = apply({"params": params, "quant": quant})
  spec = cfg.quant.spec()
  by_hand = jax.tree.map(lambda x: x, params)
  for row, (stack, layer) in zip(CODES_LxE, ROWS):
    moe = by_hand[stack][layer]["moe"]
    for name in ("w_in", "w_out"):
      moe[name] = jnp.stack([q.quantize_dequantize(moe[name][e], jnp.asarray(code), spec)
                             for e, code in enumerate(row)])
  oracle = apply({"params": by_hand})  # full precision on the hand-quantized weights
  np.testing.assert_allclose(student, oracle, rtol=1e-5, atol=1e-5)
  teacher = apply({"params": params})
  assert float(jnp.abs(student - teacher).max()) > 1e-3  # the codes changed something


def test_init_ratios_covers_every_sparse_layer_of_a_switch_student():
  cfg = small_switch(quant=QuantRules(expert_code=1, learn_scale=True, scale_init="mse"))
  _, params, _ = init_switch(cfg, jax.random.key(2))
  quant = set_expert_codes(default_quant(cfg), CODES_LxE)
  student = init_ratios(cfg, params, quant)
  spec = cfg.quant.spec()
  for row, (stack, layer) in zip(CODES_LxE, ROWS):
    moe = student[stack][layer]["moe"]
    assert "w_gate_clip" not in moe  # ReLU experts
    for name in ("w_in", "w_out"):
      want = q.search_ratio(moe[name], jnp.asarray(row), spec)
      np.testing.assert_allclose(moe[name + "_clip"], want, rtol=1e-6)
  assert "w_in_clip" not in student["encoder"]["layers_0"]["self_attn"]["q_proj"]


# The QAT recipe (a smaller configs/switch_tiny.py): bytes + 64 sentinels, span corruption of
# 48-byte windows. Every layer is sparse and attention is ternary too: with ternary experts alone
# a model this small and this briefly trained loses only ~0.004 bits per target token to RTN,
# too little for a comparison that means something.
VOCAB, SENTINELS, WINDOW, BATCH = 320, 64, 48, 16
QAT_CFG = SwitchConfig(
    vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=1,
    num_decoder_layers=1, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=8,
    expert_capacity=8, relative_attention_num_buckets=16, relative_attention_max_distance=64,
    tie_embeddings=False, quant=QuantRules(expert_code=1, attn_code=1, scale_init="mse"))
JOINT = LossWeights(task=1.0, rec=1.0, kd=1.0, value=1.0, struct=1.0, lb=0.001, z=0.001,
                    struct_margin=0.5)
PRETRAIN_STEPS, QAT_STEPS = 300, 60


def _batch(tokens, seed, step):
  return span_corruption_batch(tokens, BATCH, WINDOW, seed, step,
                               sentinel_ids=t5_sentinel_ids(VOCAB, SENTINELS), decoder_start_id=0)


@pytest.fixture(scope="module")
def qat_run():
  corpus = load_stdlib_corpus()
  train, valid = (corpus.train[:400_000].astype(np.int32), corpus.valid[:100_000].astype(np.int32))
  model, params, quant = init_switch(QAT_CFG, jax.random.key(0))
  tx = make_optimizer(OptimConfig(1e-2, 20, PRETRAIN_STEPS, 0.1, 0.0, 1.0))
  state = create_state(params, tx, None)
  step = jit_seq2seq_step(model, tx, LossWeights(lb=0.001, z=0.001))
  for i in range(PRETRAIN_STEPS):
    state, _ = step(state, batch_arrays(_batch(train, 0, i)), jax.random.key(i))
  teacher = state.params
  held = [_batch(valid, 99, i) for i in range(8)]
  tx = make_optimizer(OptimConfig(1e-3, 5, QAT_STEPS, 0.1, 0.0, 1.0))
  student = create_state(jax.tree.map(jnp.copy, teacher), tx, None,
                         quant=jax.tree.map(jnp.copy, quant),
                         teacher_params=jax.tree.map(jnp.copy, teacher))
  start = jax.tree.map(jnp.copy, student)
  step = jit_seq2seq_step(model, tx, JOINT)
  for i in range(QAT_STEPS):
    student, metrics = step(student, batch_arrays(_batch(train, 1, i)), jax.random.key(i))
  return dict(model=model, teacher=teacher, quant=quant, start=start, student=student, held=held,
              metrics=metrics)


def _losses(run):
  """seq2seq_losses jitted once per module run (a new jax.jit wrapper would compile again)."""
  if "losses" not in run:
    run["losses"] = jax.jit(functools.partial(seq2seq_losses, model=run["model"], weights=JOINT))
  return run["losses"]


def _held_terms(run, state, params):
  losses = _losses(run)
  terms = [losses(params, state, batch_arrays(b), None)[1][0] for b in run["held"][:4]]
  return {k: float(np.mean([t[k] for t in terms])) for k in terms[0]}


def test_qat_beats_round_to_nearest_and_aligns_routing(qat_run):
  run = qat_run
  teacher = evaluate_seq2seq(QAT_CFG, {"params": run["teacher"]}, run["held"])
  rtn = evaluate_seq2seq(QAT_CFG, {"params": run["teacher"], "quant": run["quant"]}, run["held"])
  qat = evaluate_seq2seq(QAT_CFG, {"params": run["student"].params, "quant": run["quant"]},
                         run["held"])
  rtn_agree = seq2seq_routing_agreement(teacher, rtn, QAT_CFG.num_experts)
  qat_agree = seq2seq_routing_agreement(teacher, qat, QAT_CFG.num_experts)
  before = _held_terms(run, run["start"], run["start"].params)
  after = _held_terms(run, run["student"], run["student"].params)
  print(f"bits/target token: teacher {teacher['bits_per_token']:.4f} RTN "
        f"{rtn['bits_per_token']:.4f} QAT {qat['bits_per_token']:.4f}; top-1 agreement RTN "
        f"{rtn_agree} QAT {qat_agree}; drop rate teacher {teacher['drop_rate']['all']:.3f} QAT "
        f"{qat['drop_rate']['all']:.3f}; held-out terms before {before} after {after}")
  # Ternary RTN hurts, and the joint QAT recovers part of it on the same held-out batches.
  assert rtn["bits_per_token"] > teacher["bits_per_token"]
  assert qat["bits_per_token"] < rtn["bits_per_token"]
  for name in ("value", "struct", "rec", "kd"):
    assert np.isfinite(before[name]) and np.isfinite(after[name]), name
  assert after["value"] < before["value"] and after["struct"] < before["struct"]
  assert qat_agree["mean"] > rtn_agree["mean"]
  assert 0 < teacher["drop_rate"]["all"] < 1  # a capacity of 8 tokens drops encoder tokens
  assert all(np.isfinite(float(v)) for v in run["metrics"].values())


def test_router_statistics_cover_every_sparse_layer(qat_run):
  stats, params = qat_run["student"].stats, qat_run["student"].params
  assert stats["count"].shape == (2, QAT_CFG.num_experts)  # encoder row, then decoder row
  enc_tokens = QAT_STEPS * BATCH * qat_run["held"][0].encoder_ids.shape[1]
  dec_tokens = QAT_STEPS * BATCH * qat_run["held"][0].decoder_ids.shape[1]
  np.testing.assert_array_equal(np.sum(stats["count"], axis=1), [enc_tokens, dec_tokens])
  assert int(stats["steps"]) == QAT_STEPS and np.all(np.asarray(stats["grad_norm_sum"]) > 0)
  # Lambda (the paper's sensitivity for Switch): the router norm change since the QAT start.
  lam = router_row_norms(params) - stats["router_norm_start"]
  want = (np.linalg.norm(params["decoder"]["layers_0"]["moe"]["router"]["kernel"], axis=0) -
          np.linalg.norm(qat_run["start"].params["decoder"]["layers_0"]["moe"]["router"]["kernel"],
                         axis=0))
  np.testing.assert_allclose(lam[1], want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(lam).max()) > 0


def test_the_gradient_reaches_every_router(qat_run):
  run = qat_run
  state, batch = run["student"], batch_arrays(run["held"][0])
  losses = _losses(run)  # the held-out terms' compiled loss: the same function, batch shape

  def loss(params):
    return losses(params, state, batch, None)[0]

  grads = jax.jit(jax.grad(loss))(state.params)
  for stack in ("encoder", "decoder"):
    assert float(jnp.linalg.norm(grads[stack]["layers_0"]["moe"]["router"]["kernel"])) > 0, stack
  # Central finite difference along the router gradient of the decoder's sparse layer.
  g = grads["decoder"]["layers_0"]["moe"]["router"]["kernel"]
  direction = g / jnp.linalg.norm(g)

  def moved(eps):
    """(loss, every sparse layer's expert ids) with the router moved by eps along g."""
    params = jax.tree.map(lambda x: x, state.params)
    moe = params["decoder"]["layers_0"]["moe"]
    moe["router"] = {**moe["router"], "kernel": moe["router"]["kernel"] + eps * direction}
    total, (_, aux) = losses(params, state, batch, None)
    return float(total), [np.asarray(aux[s]["expert_idx"]) for s in ("encoder", "decoder")]

  # The loss is smooth only while no token changes expert (top-1, the capacity's drops and lb's
  # argmax all follow the expert ids): the difference quotient uses the largest step whose
  # endpoints route every token as the unmoved router does, so it straddles no jump.
  _, routing = moved(0.0)
  for eps in (1e-3, 3e-4, 1e-4, 3e-5):
    (up, up_routing), (down, down_routing) = moved(eps), moved(-eps)
    if all(np.array_equal(a, b) and np.array_equal(a, c)
           for a, b, c in zip(routing, up_routing, down_routing)):
      break
  else:
    raise AssertionError("every step size moved a token to another expert")
  numeric = (up - down) / (2 * eps)
  np.testing.assert_allclose(numeric, float(jnp.linalg.norm(g)), rtol=5e-2)
