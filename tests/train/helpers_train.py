"""Builders shared by the training tests (tiny model, synthetic tokens)."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_model_config
from moeqjax.model import default_quant
from moeqjax.model import init_model
from moeqjax.objectives import LossWeights
from moeqjax.train import OptimConfig, create_state, make_optimizer

JOINT = LossWeights(rec=1.0, kd=1.0, value=0.5, struct=0.5)


def synthetic_tokens(n=4000, vocab=64, seed=0):
  """A learnable stream: a noisy repeating pattern."""
  r = np.random.default_rng(seed)
  base = np.tile(np.arange(vocab), n // vocab + 1)[:n]
  noise = r.integers(0, vocab, size=n)
  return np.where(r.random(n) < 0.1, noise, base).astype(np.uint8)


def make_states(qat: bool, lr=3e-3, steps=20, seed=0):
  cfg = tiny_model_config()
  model, params, quant = init_model(cfg, jax.random.key(seed))
  tx = make_optimizer(OptimConfig(lr, 2, steps, 0.1, 0.0, 1.0))
  if qat:
    state = create_state(jax.tree.map(jnp.copy, params), tx, cfg.num_layers,
                         quant=default_quant(cfg), teacher_params=params)
  else:
    state = create_state(params, tx, cfg.num_layers)
  return cfg, model, tx, state
