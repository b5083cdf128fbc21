"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), inside jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How the next token is chosen (static: part of the compiled decode step).

  Attributes:
    temperature: 0 is greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 keeps all).
    top_p: keep the smallest set of most likely tokens whose probability reaches p (1 keeps all).
    vocab_limit: draw only ids below this (0 keeps all): a model's embedding table is often
      larger than its tokenizer's vocabulary, and ids past the tokenizer's mean nothing.
  """

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  vocab_limit: int = 0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"temperature={self.temperature} must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")
    if self.vocab_limit < 0:
      raise ValueError(f"vocab_limit={self.vocab_limit} must be >= 0 (0 keeps every id)")


def sample(logits_BxV, rng, cfg: SamplingConfig):
  """Token ids [B] (int32) drawn from float logits [B, V] under `cfg`."""
  logits = logits_BxV.astype(jnp.float32)
  neg_inf = jnp.finfo(jnp.float32).min
  if 0 < cfg.vocab_limit < logits.shape[-1]:
    logits = jnp.where(jnp.arange(logits.shape[-1]) >= cfg.vocab_limit, neg_inf, logits)
  if cfg.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / cfg.temperature
  if cfg.top_k and cfg.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, cfg.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if cfg.top_p < 1:
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    # A token stays if the probability of the tokens ranked above it is still below p, so the most
    # likely token always stays.
    above = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(above < cfg.top_p, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
