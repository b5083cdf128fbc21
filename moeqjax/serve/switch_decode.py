"""Generation for the Switch Transformer (greedy or sampled): the encoder once, then one cached decoder step a token."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.model import SwitchTransformer
from moeqjax.serve.sampling import SamplingConfig, sample


def init_switch_cache(model: SwitchTransformer, batch: int, length: int, memory_len: int):
  """A zeroed decoder cache for `length` decoder positions over an encoder output of memory_len."""
  cfg = model.cfg

  def init():
    ids = jnp.zeros((batch, length), jnp.int32)
    memory = jnp.zeros((batch, memory_len, cfg.d_model), jnp.dtype(cfg.dtype))
    return model.init(jax.random.key(0), ids, memory, decode=True, method="decode")

  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(init)["cache"])


@functools.lru_cache(maxsize=None)
def _decode_fns(model_class, cfg, sampling: SamplingConfig):
  """(encode, first step, later step), compiled once per config and sampling rule (batches of one
  shape reuse them)."""
  model = model_class(cfg)

  def step(v, cache, token_B, memory, mask, rng):
    (logits, _), state = model.apply({**v, "cache": cache}, token_B[:, None], memory, mask,
                                     decode=True, method="decode", mutable=["cache"])
    return sample(logits[:, -1], rng, sampling), state["cache"]

  encode = jax.jit(lambda v, ids, m: model.apply(v, ids, m, method="encode"))
  later = jax.jit(lambda v, cache, token_B, mask, rng: step(v, cache, token_B, None, mask, rng))
  return encode, jax.jit(step), later


def switch_greedy(model: SwitchTransformer, variables, encoder_ids_BxS, max_new_tokens: int,
                  encoder_mask_BxS=None) -> np.ndarray:
  """Greedy decoding: switch_generate with the default (greedy) sampling."""
  return switch_generate(model, variables, encoder_ids_BxS, max_new_tokens, encoder_mask_BxS)


def switch_generate(model: SwitchTransformer, variables, encoder_ids_BxS, max_new_tokens: int,
                    encoder_mask_BxS=None, *, sampling: SamplingConfig = SamplingConfig(),
                    seed: int = 0) -> np.ndarray:
  """Decoding: int32 [B, max_new_tokens], the tokens after model.cfg.decoder_start_token_id.

  The first step stores the cross-attention keys/values of the encoder output; every step feeds
  one token and extends the self-attention cache. A cached step routes one token per sequence,
  so the expert capacity never drops a decoder token there (as in transformers' generate).

  Args:
    model: the Switch Transformer.
    variables: {"params": ...}, plus "quant" for the fake-quantized student.
    encoder_ids_BxS: int token ids.
    max_new_tokens: how many tokens to generate (no early stop).
    encoder_mask_BxS: bool, False at encoder padding; None: no padding.
    sampling: greedy by default; else temperature / top-k / top-p (serve.sampling.sample), the
      token of step i drawn with jax.random.fold_in(key(seed), i), as serve.generate draws.
    seed: the sampling seed.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  encoder_ids = jnp.asarray(encoder_ids_BxS, jnp.int32)
  mask = None if encoder_mask_BxS is None else jnp.asarray(encoder_mask_BxS, bool)
  b, s = encoder_ids.shape
  encode, first, later = _decode_fns(type(model), model.cfg, sampling)
  rng = jax.random.key(seed)
  memory, _ = encode(variables, encoder_ids, mask)
  cache = init_switch_cache(model, b, max_new_tokens, s)
  token = jnp.full((b,), model.cfg.decoder_start_token_id, jnp.int32)
  token, cache = first(variables, cache, token, memory, mask, jax.random.fold_in(rng, 0))
  out = [token]
  for i in range(1, max_new_tokens):
    token, cache = later(variables, cache, token, mask, jax.random.fold_in(rng, i))
    out.append(token)
  return np.asarray(jnp.stack(out, axis=1))
