"""Next-token cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
  """Negative log-likelihood in nats per token, [B, S]."""
  logp = jax.nn.log_softmax(logits_BxSxV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxS[..., None], axis=-1)[..., 0]


def cross_entropy(logits_BxSxV: jax.Array, targets_BxS: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy in nats."""
  return jnp.mean(token_nll(logits_BxSxV, targets_BxS))
