"""KV-cache decoding against full re-forwards of the growing sequence, and sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_model_config
from moeqjax.model import default_quant, set_expert_codes
from moeqjax.model import MoETransformer, QuantRules, init_model
from moeqjax.serve import (SamplingConfig, forward_cached, generate, init_cache, load_packed, pack,
                           sample)


@pytest.fixture(scope="module")
def student():
  cfg = tiny_model_config(quant=QuantRules(expert_code=1, attn_code=8), shared_d_ff=16)
  _, params, _ = init_model(cfg, jax.random.key(0))
  quant = set_expert_codes(default_quant(cfg), [[1, 2, 4, 1], [3, 1, 8, 1]])
  return cfg, params, quant


def _variants(cfg, params, quant, tmp_path):
  pack(cfg, params, quant, tmp_path / "p", fp_dtype="float32")
  served = load_packed(tmp_path / "p")
  return {"teacher": {"params": params}, "student": {"params": params, "quant": quant},
          "packed": served.variables}


def test_cached_decode_equals_full_forward_at_every_position(tmp_path, student):
  cfg, params, quant = student
  model = MoETransformer(cfg)
  prompt = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 5)), jnp.int32)
  full_forward = jax.jit(model.apply)
  for name, variables in _variants(cfg, params, quant, tmp_path).items():
    gen = generate(model, variables, prompt, 6, return_logits=True)  # greedy, KV cache
    seq = jnp.concatenate([prompt, jnp.asarray(gen.tokens)], axis=1)
    # The model is causal, so one forward of the whole sequence gives, at each position, the
    # logits of a re-forward of the sequence up to there.
    full = np.asarray(full_forward(variables, seq))[:, 4:-1]
    np.testing.assert_allclose(gen.logits, full, atol=1e-5, rtol=0, err_msg=name)
    np.testing.assert_array_equal(gen.tokens, full.argmax(-1), err_msg=name)
    assert gen.prefill_tokens_per_s > 0 and gen.decode_tokens_per_s > 0


def test_prefill_in_two_chunks_equals_one(student):
  """The cache index moves by the chunk length, so a prompt can be prefilled in pieces."""
  cfg, params, quant = student
  model = MoETransformer(cfg)
  variables = {"params": params, "quant": quant}
  toks = jnp.asarray(np.random.RandomState(4).randint(0, 64, (1, 7)), jnp.int32)
  run = jax.jit(lambda c, t, start: forward_cached(model, variables, c, t, start))
  whole, _ = run(init_cache(model, 1, 7), toks, 0)
  first, cache = run(init_cache(model, 1, 7), toks[:, :3], 0)
  second, _ = run(cache, toks[:, 3:], 3)
  np.testing.assert_allclose(np.concatenate([first, second], axis=1), whole, atol=1e-5, rtol=0)


def test_generation_stops_at_end_of_text_and_clamps_to_the_context(student):
  cfg, params, quant = student
  model = MoETransformer(cfg)
  variables = {"params": params, "quant": quant}
  prompt = np.random.RandomState(1).randint(0, 64, (1, 4))
  free = generate(model, variables, prompt, 8)
  eos = int(free.tokens[0, 2])  # pretend the third greedy token ends the text
  stopped = generate(model, variables, prompt, 8, eos_id=eos)
  first = int(np.argmax(free.tokens[0] == eos))
  assert stopped.tokens.shape[1] == first + 1 and stopped.lengths[0] == first + 1
  np.testing.assert_array_equal(stopped.tokens[0], free.tokens[0, :first + 1])
  near_end = np.zeros((1, cfg.max_seq_len - 3), np.int32)
  clamped = generate(model, variables, near_end, 10)
  assert clamped.clamped_to_context and clamped.tokens.shape[1] == 3


@pytest.mark.parametrize("prompt_len,max_new,match", [
    (32, 4, "does not fit the model's context of 32"), (4, 0, "must be at least 1"),
    (0, 4, "prompt is empty")])
def test_bad_requests_are_refused(student, prompt_len, max_new, match):
  cfg, params, _ = student
  with pytest.raises(ValueError, match=match):
    generate(MoETransformer(cfg), {"params": params}, np.zeros((1, prompt_len), np.int32), max_new)


def test_sampling_rules():
  logits = jnp.asarray(np.random.RandomState(2).randn(3, 50) * 3, jnp.float32)
  greedy = np.asarray(jnp.argmax(logits, axis=-1))
  key = jax.random.key(0)
  np.testing.assert_array_equal(sample(logits, key, SamplingConfig()), greedy)
  np.testing.assert_array_equal(sample(logits, key, SamplingConfig(1.0, top_k=1)), greedy)
  np.testing.assert_array_equal(sample(logits, key, SamplingConfig(1.0, top_p=1e-6)), greedy)
  # top-k = 3: every draw is among the 3 most likely tokens of its row, and not always the first.
  top3 = np.argsort(-np.asarray(logits), axis=-1)[:, :3]
  draws = np.stack([np.asarray(sample(logits, jax.random.key(i), SamplingConfig(2.0, top_k=3)))
                    for i in range(40)])
  assert all(np.isin(draws[:, r], top3[r]).all() for r in range(3))
  assert (draws != greedy).any()
  # top-p: the kept set is the smallest prefix of the sorted probabilities that reaches p.
  probs = np.asarray(jax.nn.softmax(logits[0]))
  order = np.argsort(-probs)
  need = int(np.searchsorted(np.cumsum(probs[order]), 0.9) + 1)
  draws = {int(sample(logits[:1], jax.random.key(i), SamplingConfig(1.0, top_p=0.9))[0])
           for i in range(200)}
  assert draws <= set(order[:need].tolist()) and len(draws) > 1
  # vocab_limit: ids at or past it are never drawn, greedy takes the best id below it.
  limit = 20
  np.testing.assert_array_equal(sample(logits, key, SamplingConfig(vocab_limit=limit)),
                                np.argmax(np.asarray(logits)[:, :limit], axis=-1))
  draws = np.stack([np.asarray(sample(logits, jax.random.key(i), SamplingConfig(5.0, vocab_limit=limit)))
                    for i in range(40)])
  assert draws.max() < limit and len(np.unique(draws)) > 3
  for bad, match in ((dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                     (dict(top_p=0.0), "top_p"), (dict(vocab_limit=-1), "vocab_limit")):
    with pytest.raises(ValueError, match=match):
      SamplingConfig(**bad)
