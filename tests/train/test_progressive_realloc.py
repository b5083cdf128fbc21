"""Progressive QAT: the codes change mid-run from the in-step statistics, with one compile (both
model families)."""

import dataclasses
import pathlib

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


def test_switch_realloc_allocates_the_sparse_layers_from_the_run_and_compiles_once():
  """A Switch QAT step with realloc: before step 2 the codes are the allocator's over the sparse
  layers (encoder's, then decoder's) at that state's params and statistics, built here by hand."""
  from moeqjax.alloc.allocation import allocate
  from moeqjax.model import init_switch
  from moeqjax.pipeline.config import load_config, switch_config
  from moeqjax.pipeline.switch_phases import progressive_step as switch_progressive_step
  from moeqjax.train import jit_seq2seq_step

  config = load_config(pathlib.Path(__file__).resolve().parents[2] / "configs" / "switch_tiny.py")
  config.model.update(dict(vocab_size=64, d_model=16, d_kv=8, num_heads=2, d_ff=32, num_layers=2,
                           num_decoder_layers=1, num_sparse_encoder_layers=1,
                           num_sparse_decoder_layers=1, num_experts=4, expert_capacity=0,
                           relative_attention_num_buckets=8, relative_attention_max_distance=16))
  cfg = switch_config(config)
  model, params, _ = init_switch(cfg, jax.random.key(0))
  tx = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4,
                                  end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0))
  quant = set_expert_codes(default_quant(cfg), np.full((2, 4), 1))  # all ternary
  state = create_state(jax.tree.map(jnp.copy, params), tx, None, quant=quant, teacher_params=None)
  jitted = jit_seq2seq_step(model, tx, LossWeights())
  realloc = ReallocConfig(every=2, method="paper_router", budget=2.5, budget_unit="code_bits")
  log = []
  step_fn = switch_progressive_step(jitted, config, realloc, log=log)
  rng = np.random.default_rng(0)
  seen, before_2 = [], None
  for step in range(4):
    enc, dec = rng.integers(1, 64, (2, 8)), rng.integers(1, 64, (2, 5))
    batch = {"encoder_ids": jnp.asarray(enc, jnp.int32), "decoder_ids": jnp.asarray(dec, jnp.int32),
             "targets": jnp.asarray(np.roll(dec, -1, axis=1), jnp.int32),
             "target_mask": jnp.ones((2, 5), bool), "encoder_mask": jnp.ones((2, 8), bool)}
    if step == 2:
      before_2 = jax.device_get((state.params, state.stats))
    state, _ = step_fn(state, batch, jax.random.key(step))
    seen.append(expert_codes(state.quant).copy())
  assert [s for s, _ in log] == [2]
  assert (seen[0] == 1).all() and (seen[1] == 1).all()
  # The oracle: the allocator on a decoder-only view built by hand, encoder's sparse layer first.
  p, stats = before_2
  view_cfg = dataclasses.replace(cfg.moe_config(), num_layers=2)
  view = {"layers_0": {"moe": p["encoder"]["layers_1"]["moe"]},
          "layers_1": {"moe": p["decoder"]["layers_0"]["moe"]}}
  want = allocate("paper_router", view_cfg, view, stats, 2.5, "code_bits").codes_LxE
  np.testing.assert_array_equal(seen[2], want)
  np.testing.assert_array_equal(log[0][1], want)
  assert not (want == 1).all()  # the budget buys more than ternary somewhere
  assert achieved(view_cfg, seen[2])["bytes"] <= budget_bytes(view_cfg, 2.5, "code_bits")
  assert jitted._cache_size() == 1  # pylint: disable=protected-access  # one compile for all codes
