"""The Switch Transformer: ReLU experts on every dispatch, config checks, jitter, the quantized student and cached decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import expert_inputs
from moeqjax.model import QuantRules, SwitchConfig, SwitchTransformer, init_switch
from moeqjax.model.config import hf_sparse_layers
from moeqjax.model.dispatch import dense_experts, gathered_experts, ragged_experts
from moeqjax.model.expert_parallel import expert_parallel_experts
from moeqjax.model.routing import switch_router_losses
from moeqjax.model.transformer import AUX_KEYS
from moeqjax.serve import switch_greedy


def tiny_switch(**changes) -> SwitchConfig:
  base = dict(vocab_size=40, d_model=16, d_kv=8, num_heads=2, d_ff=24, num_layers=2,
              num_decoder_layers=3, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=4, relative_attention_num_buckets=8, relative_attention_max_distance=16)
  base.update(changes)
  return SwitchConfig(**base)


def _relu_oracle(x, w_in, w_out, gates, idx):
  x, w_in, w_out = map(np.asarray, (x, w_in, w_out))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for j, e in enumerate(np.asarray(idx[t])):
      out[t] += float(gates[t, j]) * (np.maximum(x[t] @ w_in[e], 0) @ w_out[e])
  return out


def test_relu_experts_on_every_dispatch_match_the_loop():
  x, w_in, _, w_out, gates, idx = expert_inputs(seed=1, t=12)
  oracle = _relu_oracle(x, w_in, w_out, gates, idx)
  take = lambda w: jnp.take(w, idx.reshape(-1), axis=0)
  got = {
      "ragged": ragged_experts(x, w_in, None, w_out, gates, idx),
      "dense": dense_experts(x, w_in, None, w_out, gates, idx),
      "ep (no mesh)": expert_parallel_experts(x, w_in, None, w_out, gates, idx),
      "gathered": gathered_experts(x, take(w_in), None, take(w_out), gates),
  }
  for name, y in got.items():
    np.testing.assert_allclose(y, oracle, rtol=1e-5, atol=1e-5, err_msg=name)


def test_hf_sparse_layer_rule():
  assert hf_sparse_layers(12, 6) == (1, 3, 5, 7, 9, 11)
  assert hf_sparse_layers(15, 3) == (1, 6, 11)
  assert hf_sparse_layers(3, 3) == (0, 1, 2)
  assert hf_sparse_layers(4, 3) == (0, 1, 2, 3)  # step 1: more sparse layers than asked for
  assert hf_sparse_layers(12, 0) == (1,)  # HF's "no sparse layers" still makes layer 1 sparse
  assert hf_sparse_layers(2, 3) == ()


@pytest.mark.parametrize("changes, message", [
    (dict(num_sparse_decoder_layers=4), "num_sparse_decoder_layers=4 does not fit"),
    (dict(num_layers=4, num_sparse_encoder_layers=3), r"makes 4 sparse layer\(s\) \[0, 1, 2, 3\]"),
    (dict(num_sparse_encoder_layers=0), "num_sparse_encoder_layers=0 does not fit"),
    (dict(relative_attention_max_distance=4), "must exceed relative_attention_num_buckets"),
    (dict(expert_capacity=-1), "expert_capacity=-1"),
    (dict(decoder_start_token_id=40), "decoder_start_token_id=40"),
])
def test_config_errors_are_one_line(changes, message):
  with pytest.raises(ValueError, match=message) as e:
    tiny_switch(**changes)
  assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def switch_model():
  cfg = tiny_switch(expert_capacity=3, router_bias=True, router_jitter=0.1)
  model, params, quant = init_switch(cfg, jax.random.key(0))
  return model, params, quant


def _ids(batch, seq, seed):
  return jnp.asarray(np.random.default_rng(seed).integers(2, 40, (batch, seq)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("model", "train"))
def _apply(model, variables, enc, dec, rngs=None, train=False):
  """model.apply, compiled once per (model, train, input shapes) for the whole module."""
  return model.apply(variables, enc, dec, train=train, rngs=rngs)


def test_aux_has_the_decoder_only_format_per_sparse_layer(switch_model):
  model, params, _ = switch_model
  enc, dec = _ids(2, 10, 0), _ids(2, 6, 1)
  logits, aux = _apply(model, {"params": params}, enc, dec)
  assert logits.shape == (2, 6, 40) and logits.dtype == jnp.float32
  for stack, seq, layers in (("encoder", 10, 1), ("decoder", 6, 1)):
    assert set(aux[stack]) == set(AUX_KEYS)
    assert aux[stack]["router_logits"].shape == (layers, 2 * seq, 4)
    assert aux[stack]["expert_idx"].shape == aux[stack]["gates"].shape == (layers, 2 * seq, 1)
    # The gate is the argmax expert's probability (top-1, not renormalised).
    probs = jax.nn.softmax(aux[stack]["router_logits"], axis=-1)
    np.testing.assert_allclose(aux[stack]["gates"][..., 0], probs.max(-1), rtol=1e-6)
  # A capacity of 3 with 10 tokens over 4 experts must drop some.
  assert float(aux["encoder"]["drop_rate"][0]) > 0


def test_router_losses_balanced_value():
  # Uniform logits: z = log(E)^2, aux = E^2 * mean(f * 1/E) = 1 for any argmax.
  z, lb = switch_router_losses(jnp.zeros((2, 3, 5, 4)))
  np.testing.assert_allclose(z, np.log(4) ** 2, rtol=1e-6)
  np.testing.assert_allclose(lb, 1.0, rtol=1e-6)


def test_jitter_only_in_training(switch_model):
  model, params, _ = switch_model
  enc, dec = _ids(2, 10, 2), _ids(2, 6, 3)  # the shapes above: the evaluation is compiled
  evaluated, aux = _apply(model, {"params": params}, enc, dec)
  again, _ = _apply(model, {"params": params}, enc, dec, rngs={"jitter": jax.random.key(1)})
  np.testing.assert_array_equal(evaluated, again)
  _, trained = _apply(model, {"params": params}, enc, dec, train=True,
                      rngs={"jitter": jax.random.key(1)})
  ratio = trained["encoder"]["router_logits"] - aux["encoder"]["router_logits"]
  assert float(jnp.abs(ratio).max()) > 0
  with pytest.raises(Exception, match="jitter"):
    model.apply({"params": params}, enc, dec, train=True)


def test_quantized_student_reads_codes_as_data(switch_model):
  """Every sparse layer's experts follow the `quant` codes; new codes need no recompile."""
  model, params, quant = switch_model
  student = SwitchTransformer(model.cfg.replace(quant=QuantRules(expert_code=2)))
  quant = student.init(jax.random.key(0), _ids(1, 4, 0), _ids(1, 4, 0))["quant"]
  assert sorted(quant) == ["decoder", "encoder"]
  assert quant["encoder"]["layers_1"]["moe"]["expert_bits"].tolist() == [2, 2, 2, 2]
  enc, dec = _ids(2, 10, 4), _ids(2, 6, 5)
  apply = jax.jit(lambda q: student.apply({"params": params, "quant": q}, enc, dec)[0])
  teacher = _apply(model, {"params": params}, enc, dec)[0]
  two_bit = apply(quant)
  full = apply(jax.tree.map(jnp.zeros_like, quant))  # code 0 everywhere = full precision
  np.testing.assert_allclose(full, teacher, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(two_bit - teacher).max()) > 1e-3
  assert apply._cache_size() == 1


def test_cached_greedy_equals_uncached_full_sequence():
  # A decoder capacity no prefix exceeds: the full-sequence pass then drops no decoder token, as
  # a cached step (one token per call) never does.
  cfg = tiny_switch(expert_capacity=8, num_decoder_layers=2, num_sparse_decoder_layers=2)
  model, params, _ = init_switch(cfg, jax.random.key(3))
  params = jax.tree.map(lambda w: w * 3.0, params)  # peaked logits: decisive greedy steps
  enc = _ids(2, 7, 6)
  new = 6
  cached = switch_greedy(model, {"params": params}, enc, new)
  buf = np.full((2, new + 1), cfg.decoder_start_token_id, np.int32)
  apply = jax.jit(lambda d: model.apply({"params": params}, enc, d)[0])
  for t in range(new):
    # Causal self-attention: position t's logits depend on tokens <= t only.
    buf[:, t + 1] = np.asarray(apply(jnp.asarray(buf))[:, t].argmax(-1))
  np.testing.assert_array_equal(cached, buf[:, 1:])
  assert len(np.unique(cached)) > 2, "degenerate generation would not test much"
