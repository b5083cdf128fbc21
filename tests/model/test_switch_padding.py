"""Source padding of seq2seq pair batches: a padded example trains and scores as it does alone, unpadded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax.data.seq2seq import Seq2SeqBatch, pair_batch
from moeqjax.eval import evaluate_seq2seq, seq2seq_routing_agreement
from moeqjax.model import (QuantRules, SwitchConfig, default_quant, init_ratios, init_switch,
                           set_expert_codes)
from moeqjax.objectives import LossWeights
from moeqjax.pipeline.switch_phases import per_example_agreement
from moeqjax.train import (OptimConfig, batch_arrays, create_state, jit_seq2seq_step,
                           make_optimizer)

# Every term of the joint objective on; no router jitter (its noise depends on the token count).
JOINT = LossWeights(task=1.0, rec=1.0, kd=1.0, value=1.0, struct=1.0, lb=0.01, z=0.01,
                    struct_margin=0.5)
# (source, target) byte pairs below the vocabulary; sources of 3..7 tokens padded to 9.
PAIRS = [(bytes([5, 6, 7, 8, 9]), bytes([11, 12, 13])),
         (bytes([20, 3, 21, 22, 4, 30, 31]), bytes([14, 15, 16, 17, 18])),
         (bytes([33, 2, 34]), bytes([19, 25]))]
SOURCE_LEN, TARGET_LEN = 9, 6


def _cfg(**changes) -> SwitchConfig:
  base = dict(vocab_size=40, d_model=16, d_kv=8, num_heads=2, d_ff=24, num_layers=2,
              num_decoder_layers=2, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
              num_experts=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
              router_jitter=0.0, tie_embeddings=False,
              quant=QuantRules(expert_code=1, scale_init="mse"))
  return SwitchConfig(**{**base, **changes})


def _pairs_batch(pairs, source_len, target_len) -> Seq2SeqBatch:
  """pair_batch's rows, one per pair in order (pair_batch picks at random)."""
  rows = [pair_batch([p], 1, source_len, target_len, 0, 0, encode=list, pad_id=0,
                     decoder_start_id=1) for p in pairs]
  return Seq2SeqBatch(**{f.name: np.concatenate([getattr(r, f.name) for r in rows])
                         for f in dataclasses.fields(Seq2SeqBatch)})


def _alone(pair) -> Seq2SeqBatch:
  """The pair unpadded: the batch's lengths are its own."""
  return _pairs_batch([pair], len(pair[0]), len(pair[1]))


@pytest.fixture(scope="module")
def student():
  cfg = _cfg()
  model, teacher, _ = init_switch(cfg, jax.random.key(0))
  quant = set_expert_codes(default_quant(cfg), [[1, 2, 4, 0], [8, 1, 3, 2], [2, 0, 1, 4]])
  return cfg, model, teacher, quant, init_ratios(cfg, teacher, quant)


def test_pair_batch_marks_the_source_padding():
  b = _pairs_batch(PAIRS, SOURCE_LEN, TARGET_LEN)
  assert b.encoder_mask.tolist() == [[i < len(s) for i in range(SOURCE_LEN)] for s, _ in PAIRS]
  assert b.encoder_ids[~b.encoder_mask].tolist() == [0] * int((~b.encoder_mask).sum())


def test_every_loss_term_and_the_train_step_of_a_padded_example_equal_it_alone(student):
  cfg, model, teacher, quant, params = student
  tx = make_optimizer(OptimConfig(1e-2, 1, 10, 0.1, 0.0, 1.0))

  def state():  # fresh buffers: the step donates its state
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    return create_state(copy(params), tx, None, quant=copy(quant), teacher_params=copy(teacher))

  step = jit_seq2seq_step(model, tx, JOINT)  # its metrics hold every loss term: train/<name>
  pair = PAIRS[0]
  padded = batch_arrays(_pairs_batch([pair], SOURCE_LEN, TARGET_LEN))
  alone = batch_arrays(_alone(pair))
  s_pad, got = step(state(), padded, jax.random.key(0))
  s_alone, want = step(state(), alone, jax.random.key(0))
  names = {"task", "lb", "z", "rec", "kd", "value", "struct"}
  assert {k for k in want if k.startswith("train/")} >= {f"train/{n}" for n in names}
  for name in names | {"loss", "grad_norm"}:
    assert float(want[f"train/{name}"]) > 0, name
    np.testing.assert_allclose(got[f"train/{name}"], want[f"train/{name}"], rtol=2e-5,
                               atol=1e-7, err_msg=name)
  # The padding does matter: attending to it (the encoder mask all True) changes the loss.
  unmasked = dict(padded, encoder_mask=jnp.ones_like(padded["encoder_mask"]))
  _, attended = step(state(), unmasked, jax.random.key(0))
  assert abs(float(attended["train/task"]) - float(want["train/task"])) > 1e-4
  # The same update, and router statistics that count real tokens only.
  np.testing.assert_array_equal(s_pad.stats["count"], s_alone.stats["count"])
  # rows: the encoder's 2 sparse layers (5 source tokens), the decoder's 1 (3 target tokens)
  assert np.asarray(s_pad.stats["count"]).sum(axis=1).tolist() == [5, 5, 3]
  np.testing.assert_allclose(s_pad.stats["gate_sum"], s_alone.stats["gate_sum"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               s_pad.params, s_alone.params)


@pytest.mark.parametrize("capacity", [0, 2])
def test_evaluation_of_a_padded_batch_is_each_example_alone(student, capacity):
  # With a capacity, right padding ranks after every real token of its row, so it never displaces
  # one: the real tokens' drops, and so their loss, are the example's own.
  cfg, _, teacher, quant, params = student
  cfg = cfg.replace(expert_capacity=capacity)
  variants = {"teacher": {"params": teacher}, "student": {"params": params, "quant": quant}}
  padded = {n: evaluate_seq2seq(cfg, v, [_pairs_batch(PAIRS, SOURCE_LEN, TARGET_LEN)])
            for n, v in variants.items()}
  alone = {n: [evaluate_seq2seq(cfg, v, [_alone(p)]) for p in PAIRS]
           for n, v in variants.items()}
  for name in variants:
    want = np.concatenate([a["bits_per_example"] for a in alone[name]])
    np.testing.assert_allclose(padded[name]["bits_per_example"], want, rtol=1e-5)
    assert padded[name]["tokens"] == sum(len(t) for _, t in PAIRS)
    for s in ("encoder", "decoder"):
      mask = padded[name]["token_mask"][s]
      real = np.concatenate([a["expert_idx"][s] for a in alone[name]], axis=1)
      np.testing.assert_array_equal(padded[name]["expert_idx"][s][:, mask], real)
      # The drop rate over real tokens: the alone rates weighted by each example's tokens.
      n = np.asarray([a["token_mask"][s].sum() for a in alone[name]], np.float64)
      rates = np.stack([a["drop_rate"][s] for a in alone[name]])
      np.testing.assert_allclose(padded[name]["drop_rate"][s], n @ rates / n.sum(), atol=1e-6)
  if capacity:
    assert padded["teacher"]["drop_rate"]["all"] > 0
  # Agreement with the teacher over real tokens, per layer and per example.
  got = seq2seq_routing_agreement(padded["teacher"], padded["student"], cfg.num_experts)
  for s in ("encoder", "decoder"):
    ref = np.concatenate([a["expert_idx"][s] for a in alone["teacher"]], axis=1)
    stu = np.concatenate([a["expert_idx"][s] for a in alone["student"]], axis=1)
    np.testing.assert_allclose(got[s], np.mean(ref[..., 0] == stu[..., 0], axis=1))
  per_example = per_example_agreement(padded["teacher"], padded["student"], cfg.num_experts,
                                      len(PAIRS))
  want = [per_example_agreement(t, u, cfg.num_experts, 1)[0]
          for t, u in zip(alone["teacher"], alone["student"])]
  np.testing.assert_allclose(per_example, want, rtol=1e-12)
  assert len(set(np.round(want, 6))) > 1  # the examples' agreements differ: a real check
