"""Autoregressive generation with a KV cache: one compiled prefill, one compiled decode step."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.model import MoETransformer
from moeqjax.serve.sampling import SamplingConfig, sample


def init_cache(model: MoETransformer, batch: int, length: int):
  """A zeroed KV cache (the `cache` collection) for `batch` sequences of up to `length` tokens."""
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((batch, length), jnp.int32), decode=True))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract["cache"])


def forward_cached(model: MoETransformer, variables, cache, tokens_BxS, start: int | jax.Array):
  """Logits [B, S, V] of tokens at positions start.. that extend the cached ones; the new cache."""
  b, s = tokens_BxS.shape
  positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
  logits, updated = model.apply({**variables, "cache": cache}, tokens_BxS, positions, decode=True,
                                mutable=["cache"])
  return logits, updated["cache"]


@dataclasses.dataclass
class Generation:
  """What `generate` produced and how fast.

  Attributes:
    tokens: int32 [B, n] new tokens (after an end-of-text, a row repeats it).
    lengths: [B] new tokens per row up to and including its end-of-text.
    prefill_tokens_per_s, decode_tokens_per_s: throughput, compile time excluded.
    compile_s: time spent compiling prefill and the decode step.
    clamped_to_context: max_new_tokens was lowered to fit the model's context.
    logits: float32 [B, n, V] the logits each new token was drawn from (with return_logits).
  """

  tokens: np.ndarray
  lengths: np.ndarray
  prefill_tokens_per_s: float
  decode_tokens_per_s: float
  compile_s: float
  clamped_to_context: bool
  logits: np.ndarray | None = None


def check_request(prompt_len: int, max_new_tokens: int, context: int) -> int:
  """The number of tokens to generate, or a ValueError that says what to change."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")
  if prompt_len < 1:
    raise ValueError("the prompt is empty; give at least one token")
  if prompt_len >= context:
    raise ValueError(f"the prompt has {prompt_len} tokens, which does not fit the model's context of "
                     f"{context} (model.max_seq_len) with room to generate; shorten it")
  return min(max_new_tokens, context - prompt_len)


def generate(model: MoETransformer, variables, prompt_BxS, max_new_tokens: int, *,
             sampling: SamplingConfig = SamplingConfig(), seed: int = 0,
             eos_id: int | None = None,
             on_tokens: Callable[[np.ndarray], None] | None = None,
             return_logits: bool = False) -> Generation:
  """Generates up to `max_new_tokens` tokens after each prompt row, with a KV cache.

  Prefill runs the prompt once; then each step feeds one token per row. Both are compiled ahead of
  time (once each), so the throughput figures exclude compilation. Stops early when every row has
  produced `eos_id`.

  Args:
    model: the transformer (teacher, fake-quant student or packed: the variables decide).
    variables: {"params": ...} plus "quant" (student) or "packed" (packed checkpoint).
    prompt_BxS: int token ids [B, S] (equal-length prompts).
    max_new_tokens: at most this many tokens per row (lowered to fit model.max_seq_len).
    sampling: greedy by default.
    seed: the sampling seed.
    eos_id: end-of-text id, or None.
    on_tokens: called with each step's new ids [B] (numpy), e.g. to stream text.
    return_logits: also return the logits of every step (one device-to-host copy a step).

  Returns:
    A Generation.
  """
  prompt = jnp.asarray(prompt_BxS, jnp.int32)
  b, s = prompt.shape
  n_new = check_request(s, max_new_tokens, model.cfg.max_seq_len)
  cache = init_cache(model, b, s + n_new)

  def prefill(variables, cache, tokens, rng):
    logits, cache = forward_cached(model, variables, cache, tokens, 0)
    return sample(logits[:, -1], rng, sampling), logits[:, -1], cache

  def step(variables, cache, token_B, position, rng):
    logits, cache = forward_cached(model, variables, cache, token_B[:, None], position)
    return sample(logits[:, -1], rng, sampling), logits[:, -1], cache

  rng = jax.random.key(seed)
  t0 = time.perf_counter()
  prefill_c = jax.jit(prefill, donate_argnums=(1,)).lower(variables, cache, prompt, rng).compile()
  token_spec = jax.ShapeDtypeStruct((b,), jnp.int32)
  step_c = jax.jit(step, donate_argnums=(1,)).lower(
      variables, cache, token_spec, jnp.int32(0), rng).compile()
  compile_s = time.perf_counter() - t0

  t0 = time.perf_counter()
  token, logits, cache = prefill_c(variables, cache, prompt, jax.random.fold_in(rng, 0))
  token_np = np.asarray(token)  # waits for the device
  prefill_s = time.perf_counter() - t0
  out = [token_np]
  all_logits = [np.asarray(logits)] if return_logits else None
  done = np.zeros(b, bool) if eos_id is None else token_np == eos_id
  if on_tokens:
    on_tokens(token_np)
  t0 = time.perf_counter()
  for i in range(1, n_new):
    if done.all():
      break
    token, logits, cache = step_c(variables, cache, token, jnp.int32(s + i - 1),
                                  jax.random.fold_in(rng, i))
    token_np = np.where(done, out[-1], np.asarray(token))
    out.append(token_np)
    if return_logits:
      all_logits.append(np.asarray(logits))
    if on_tokens:
      on_tokens(token_np)
    if eos_id is not None:
      done |= token_np == eos_id
  decode_s = time.perf_counter() - t0
  tokens = np.stack(out, axis=1).astype(np.int32)
  lengths = np.full(b, tokens.shape[1])
  if eos_id is not None:
    hit = tokens == eos_id
    lengths = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, tokens.shape[1])
  steps = tokens.shape[1] - 1
  return Generation(
      tokens=tokens, lengths=lengths,
      prefill_tokens_per_s=b * s / max(prefill_s, 1e-9),
      decode_tokens_per_s=b * steps / decode_s if steps else float("nan"),
      compile_s=compile_s, clamped_to_context=n_new < max_new_tokens,
      logits=None if all_logits is None else np.stack(all_logits, axis=1))
