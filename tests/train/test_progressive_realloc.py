"""Progressive QAT: the codes change mid-run from the in-step statistics, with one compile."""

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.alloc.allocation import achieved, budget_bytes
from moeqjax.data import sample_batch
from moeqjax.model import default_quant, expert_codes, init_model, set_expert_codes
from moeqjax.objectives import LossWeights
from moeqjax.pipeline.qat import ReallocConfig, progressive_step
from moeqjax.train import OptimConfig, create_state, jit_train_step, make_optimizer

from conftest import tiny_model_config


def test_realloc_changes_codes_without_recompile():
  cfg = tiny_model_config(vocab_size=256)
  model, params, _ = init_model(cfg, jax.random.key(0))
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=5,
                                  end_lr_fraction=0.1,
                                  weight_decay=0.0, grad_clip=1.0))
  quant = set_expert_codes(default_quant(cfg), np.full((2, 4), 1))  # all ternary
  state = create_state(jax.tree.map(jnp.copy, params), tx, cfg.num_layers, quant=quant,
                       teacher_params=None)
  jitted = jit_train_step(model, tx, LossWeights())
  realloc = ReallocConfig(every=2, method="paper_router", budget=2.5, budget_unit="code_bits")
  log = []
  step_fn = progressive_step(jitted, cfg, realloc, log=log)
  tokens = np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint8)
  seen = []
  for step in range(5):
    state, _ = step_fn(state, jnp.asarray(sample_batch(tokens, 2, 16, 0, step)), jax.random.key(0))
    seen.append(expert_codes(state.quant, cfg.num_layers).copy())
  assert [s for s, _ in log] == [2, 4]
  assert (seen[0] == 1).all() and (seen[1] == 1).all()  # before the first re-allocation
  assert not (seen[2] == 1).all()  # re-allocated before step 2
  np.testing.assert_array_equal(seen[2], log[0][1])
  assert achieved(cfg, seen[2])["bytes"] <= budget_bytes(cfg, 2.5, "code_bits")
  assert jitted._cache_size() == 1  # pylint: disable=protected-access  # one compile for all codes
