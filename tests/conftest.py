"""Shared tiny shapes for tests (D=16, E=4, k=2)."""

import os
import pathlib
import shutil
import sys

# Tests run tiny shapes, so XLA compile time dominates their cost: LLVM optimization level 0
# cuts the suite's time by about a third on 2 CPU cores. Set before jax is imported.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from moeqjax.model import ModelConfig, QuantRules


def tiny_model_config(**changes) -> ModelConfig:
  base = dict(vocab_size=64, d_model=16, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8,
              d_ff=32, num_experts=4, top_k=2, max_seq_len=32,
              quant=QuantRules(expert_code=1, granularity="channel"))
  base.update(changes)
  return ModelConfig(**base)


def expert_inputs(seed=0, t=10, d=16, f=32, e=4, k=2):
  """Random MoE dispatch inputs: (x [T,D], w_in, w_gate [E,D,F], w_out [E,F,D], gates, idx [T,K])."""
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  w_in, w_gate = (jnp.asarray(r.normal(size=(e, d, f)) / 4, jnp.float32) for _ in range(2))
  w_out = jnp.asarray(r.normal(size=(e, f, d)) / 4, jnp.float32)
  idx = jnp.asarray(np.stack([r.choice(e, size=k, replace=False) for _ in range(t)]), jnp.int32)
  gates = jax.nn.softmax(jnp.asarray(r.normal(size=(t, k)), jnp.float32))
  return x, w_in, w_gate, w_out, gates, idx


@pytest.fixture
def tiny_cfg():
  return tiny_model_config()


@pytest.fixture
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 12)), jnp.int32)


@pytest.fixture
def rng():
  return jax.random.key(0)


def numpy_student(cfg, codes_LxE, seed=0, embed_scale=1.0):
  """(params, quant) drawn in numpy from the param shapes (no model init, which costs seconds).

  `embed_scale` > 1 makes logits peaked (decisive greedy steps for runtime comparisons).
  """
  from moeqjax.model import default_quant
  from moeqjax.serve.checkpoint import param_shapes
  rng = np.random.default_rng(seed)
  params = {}
  for name, shape in param_shapes(cfg).items():
    if name.endswith("_clip"):  # ratios away from 1 (some above), so folding them into scales shows
      value = rng.uniform(0.6, 1.2, shape)
    elif name.endswith("scale"):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)
    node = params
    *parents, leaf = name.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = np.asarray(value * (embed_scale if name == "embedding" else 1.0), np.float32)
  quant = default_quant(cfg)
  for i, codes in enumerate(codes_LxE):
    quant[f"layers_{i}"]["moe"]["expert_bits"] = np.asarray(codes, np.int32)
  return params, quant


# The 8-device mesh checks run in one subprocess (JAX fixes the CPU device count at start-up). It
# is started as soon as collection selects its test, so that it compiles beside the rest of the
# suite instead of after it; tests/train/test_mesh_step.py collects its output.
MESH_CHILD = {}
# Likewise the two-process check (tests/train/test_multiprocess.py), under "multiprocess".
BACKGROUND = {}


def pytest_collection_modifyitems(session, config, items):
  del session, config
  wanted = {name for item in items for name in getattr(item, "fixturenames", ())}
  if wanted & {"mesh_out", "multiprocess_runs"}:
    sys.path.insert(0, str(pathlib.Path(__file__).with_name("train")))
  if "mesh_out" in wanted:
    from mesh_launch import start_mesh_child
    MESH_CHILD["proc"] = start_mesh_child()
  if "multiprocess_runs" in wanted:
    from multiprocess_launch import start_launcher
    BACKGROUND["multiprocess"] = start_launcher()


def pytest_sessionfinish(session, exitstatus):
  """Stops the background subprocesses this session started if their tests never collected
  them (e.g. -x)."""
  del session, exitstatus
  proc = MESH_CHILD.pop("proc", None)
  if proc is not None:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
    shutil.rmtree(proc.scratch, ignore_errors=True)
  proc = BACKGROUND.pop("multiprocess", None)
  if proc is not None:
    if proc.poll() is None:
      proc.terminate()  # the launcher then stops its own children
      proc.wait()
    shutil.rmtree(proc.scratch, ignore_errors=True)
