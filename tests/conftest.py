"""Shared tiny shapes for tests (D=16, E=4, k=2)."""

import os
import pathlib
import sys

# Tests run tiny shapes, so XLA compile time dominates their cost (about 60% of the suite's CPU
# time, most of it in thousands of small compiles). LLVM optimization level 0 cut the suite's time by
# about a third on 2 CPU cores; XLA:CPU's older loop emitters compile a tiny model's train step in
# about half the time of its MLIR fusion emitters (benchmarked here on 2 cores); both compile the
# same HLO graph. Set before jax is imported; a flag the caller gives wins.
for _flag in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"):
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

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


def pytest_xdist_auto_num_workers(config):
  """`-n auto` (addopts): one worker per CPU this process may use (os.cpu_count counts the host's
  in a container), at most 4, since every worker imports JAX and torch."""
  del config
  return max(1, min(4, len(os.sched_getaffinity(0))))


# The 8-device mesh checks run in one subprocess (JAX fixes the CPU device count at start-up), and
# the two-process check in others. They start as soon as collection selects their tests, so that
# they compile beside the rest of the suite instead of after it. Under pytest-xdist every worker
# collects every test, so worker gw0 alone starts them; their tests, on whichever worker, read
# what they left in the run's shared folder (tests/train/mesh_launch.py).
STARTED = {}


def pytest_collection_modifyitems(session, config, items):
  del session, config
  wanted = {name for item in items for name in getattr(item, "fixturenames", ())}
  if not wanted & {"mesh_out", "multiprocess_runs"}:
    return
  sys.path.insert(0, str(pathlib.Path(__file__).with_name("train")))
  if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
    return
  if "mesh_out" in wanted:
    from mesh_launch import start_mesh_child
    STARTED["mesh"] = start_mesh_child()
  if "multiprocess_runs" in wanted:
    from multiprocess_launch import start_launcher
    STARTED["multiprocess"] = start_launcher()


def pytest_sessionfinish(session, exitstatus):
  """Waits for the background scripts this process started (another worker may still read them),
  or stops them when the run was cut short (-x, Ctrl-C) and their tests may never come."""
  cut_short = bool(session.shouldstop or session.shouldfail) or exitstatus == 2
  for started in STARTED.values():
    if cut_short:
      started.stop()
    else:
      started.wait()
  STARTED.clear()
