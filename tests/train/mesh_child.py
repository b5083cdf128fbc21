"""Run in a subprocess with 8 CPU devices: sharded QAT steps vs the single-device step, as JSON.

JAX fixes the CPU device count when it starts, and the pytest process already has one device, so
tests/train/test_mesh_step.py runs this file once with
XLA_FLAGS=--xla_force_host_platform_device_count=8 and a scratch folder (argv[1]), and asserts on
what it prints.
"""

import dataclasses
import functools
import json
import pathlib
import shutil
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.model import ModelConfig, MoETransformer, QuantRules, init_model, set_expert_codes
from moeqjax.model.capacity import capacity_keep
from moeqjax.model.dispatch import dense_experts
from moeqjax.model.expert_parallel import expert_parallel_experts, pair_counts
from moeqjax.model.moe import MoE
from moeqjax.eval import evaluate_variants
from moeqjax.objectives import LossWeights
from moeqjax.train import (Checkpointer, LoopConfig, OptimConfig, create_state, jit_train_step,
                           make_optimizer, run_training, with_quant)
from moeqjax.train.mesh import MeshConfig, make_mesh
from moeqjax.train.sharding import eval_placement, init_sharded, placement

STEPS = 3
BATCH, SEQ = 16, 8
WEIGHTS = LossWeights(rec=1.0, kd=1.0, value=0.5, struct=0.5)
# Mixtral-style (top-2 of 8, renormalised gates) and Qwen2-MoE-style (a gated shared expert, qkv
# bias, gates not renormalised; here top-1 of 4). Mixed allocations: every code in play.
MODELS = {
    "mixtral": (dict(num_experts=8, top_k=2),
                [[1, 2, 4, 8, 0, 3, 1, 2]]),
    "qwen2moe": (dict(num_experts=4, top_k=1, shared_d_ff=32, shared_expert_gate=True,
                      attn_bias=True, norm_topk_prob=False),
                 [[1, 2, 4, 0]]),
    # Options that change the step on a mesh, each on its own: learned clip ratios (student params
    # the teacher does not have) and an expert capacity (pairs dropped by the global rule).
    "mixtral_clip": (dict(num_experts=8, top_k=2, quant=QuantRules(
        expert_code=1, granularity="channel", learn_clip=True)), [[1, 2, 4, 8, 0, 3, 1, 2]]),
    "mixtral_cap": (dict(num_experts=8, top_k=2, capacity_factor=1.0),
                    [[1, 2, 4, 8, 0, 3, 1, 2]]),
}
MESHES = [  # (model, mesh sizes, dispatch on the mesh; the single-device step is "ragged")
    ("mixtral", dict(data=8), "ragged"),
    ("mixtral", dict(data=2, fsdp=4), "ragged"),
    ("mixtral", dict(data=2, expert=4), "ragged"),  # experts sharded, GSPMD's collectives
    ("mixtral", dict(data=4, tensor=2), "ragged"),  # the tensor axis alone: heads, mlp, vocab
    # The tensor axis rides along with expert=2 here: one compile fewer on the 2-core CI. This
    # step runs the shard_map expert-parallel exchange (model.dispatch="ep").
    ("qwen2moe", dict(data=2, expert=2, tensor=2), "ep"),
    ("mixtral_clip", dict(data=2, expert=4), "ragged"),
    ("mixtral_cap", dict(data=2, expert=4), "ep"),
]
# Evaluation (evaluate_variants) on a mesh vs one device: the teacher and a quantized student.
EVAL_MESHES = [("mixtral", dict(data=2, expert=4), "ep"), ("mixtral", dict(data=4, tensor=2),
               "ragged"), ("qwen2moe", dict(data=2, expert=2, tensor=2), "ep")]
# One MoE block, forward and gradients: model.dispatch="ep" on a mesh vs "dense" on one device.
# (model, mesh sizes, act_bits): int8 activations on one of them (per-expert x_q inputs).
EP_BLOCKS = [("mixtral", dict(data=2, expert=4), 0),
             ("qwen2moe", dict(data=2, expert=2, tensor=2), 8)]


def model_config(changes):
  base = dict(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
              d_ff=32, max_seq_len=16, quant=QuantRules(expert_code=1, granularity="channel"))
  return ModelConfig(**{**base, **changes})


OPTIM = OptimConfig(3e-3, 1, 10, 0.1, 0.1, 1.0)


def abstract_state(cfg):
  """The shape-only QAT state of `cfg` (no sharding on any leaf), as the pipeline restores into."""
  def build():
    _, teacher, quant = init_model(cfg, jax.random.key(0))
    return build_state(teacher, quant, tx=make_optimizer(OPTIM), num_layers=cfg.num_layers)
  return jax.eval_shape(build)


def build_state(teacher, quant, *, tx, num_layers):
  return create_state(jax.tree.map(jnp.copy, teacher), tx, num_layers, quant=quant,
                      teacher_params=teacher)


@functools.lru_cache(maxsize=None)
def _init(cfg):
  """The model, teacher params and codes of a config, initialised once (eager init is slow)."""
  return init_model(cfg, jax.random.key(0))


def run(cfg, codes, mesh_cfg):
  """3 QAT steps from the same teacher and batches: (metrics per step, state, step fn, batch).

  mesh_cfg None is today's single-device path (no shardings anywhere).
  """
  # The dispatch changes no parameter: one init serves every dispatch of a model.
  _, teacher, quant = _init(cfg.replace(dispatch="ragged"))
  model = MoETransformer(cfg)
  quant = set_expert_codes(quant, np.asarray(codes))
  tx = make_optimizer(OPTIM)
  build = functools.partial(build_state, tx=tx, num_layers=cfg.num_layers)
  place = None
  if mesh_cfg is None:
    state = jax.jit(build)(teacher, quant)  # one compile, not one per eager op
  else:
    place = placement(mesh_cfg, cfg, jax.eval_shape(build, teacher, quant), BATCH)
    state = init_sharded(build, place.state, teacher, quant)
  step = jit_train_step(model, tx, WEIGHTS, placement=place)
  r = np.random.default_rng(0)
  history = []
  for i in range(STEPS):
    batch = jnp.asarray(r.integers(0, cfg.vocab_size, size=(BATCH, SEQ + 1)), jnp.int32)
    if place is not None:
      batch = place.put_batch(batch)
    state, metrics = step(state, batch, jax.random.key(i))
    history.append({k: float(v) for k, v in metrics.items()})
  return history, state, step, batch, place


def ep_block(name, sizes, act_bits):
  """EP vs dense oracle for one MoE block: relative errors of y, the loss and every gradient, and
  the dropless count (each (token, k) pair computed once, by its own expert)."""
  changes, codes = MODELS[name]
  cfg = model_config(changes)
  cfg = cfg.replace(quant=dataclasses.replace(cfg.quant, act_bits=act_bits))
  r = np.random.default_rng(1)
  x = jnp.asarray(r.normal(size=(BATCH, SEQ, cfg.d_model)), jnp.float32)
  probe = jnp.asarray(r.normal(size=x.shape), jnp.float32)  # a loss whose gradient is not flat
  variables = nn.meta.unbox(jax.jit(MoE(cfg).init)(jax.random.key(2), x))  # eager init is slow
  quant = {"expert_bits": jnp.asarray(codes[0], jnp.int32)}

  def value_and_grads(dispatch):
    def loss(params, x):
      y, aux = MoE(cfg.replace(dispatch=dispatch)).apply({"params": params, "quant": quant}, x)
      return jnp.sum(y * probe), (y, aux["expert_idx"])
    (value, (y, idx)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        variables["params"], x)
    return value, y, grads, idx

  ref = jax.jit(lambda: value_and_grads("dense"))()
  def ep_and_counts():
    out = value_and_grads("ep")
    return out, pair_counts(out[3], cfg.num_experts)

  with jax.set_mesh(make_mesh(MeshConfig(**sizes))):
    got, counts = jax.jit(ep_and_counts)()
  done, expert, rows = (np.asarray(c) for c in counts)
  idx = np.asarray(ref[3])
  return {"model": name, "sizes": sizes, "act_bits": act_bits,
          "loss": rel_err(got[0], ref[0]), "y": rel_err(got[1], ref[1]),
          "grads": {jax.tree_util.keystr(p): rel_err(a, b) for (p, a), b in zip(
              jax.tree_util.tree_leaves_with_path(got[2]), jax.tree.leaves(ref[2]))},
          "same_routing": bool(np.array_equal(np.asarray(got[3]), idx)),
          "pairs": int(idx.size), "pairs_done_once": bool(np.all(done == 1)),
          "pairs_by_own_expert": bool(np.array_equal(expert, idx)), "rows_computed": int(rows)}


def ep_capacity(factor=0.75):
  """model.dispatch="ep" with a capacity on expert=4 x data=2, E=8, k=2, 4 sequences of 8 tokens:
  the pairs kept and sent,
  and the output vs the dense oracle on one device with the same keep mask."""
  sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))
  from capacity_oracle import skewed_idx
  r = np.random.default_rng(4)
  t, d, f, e = 32, 8, 8, 8
  x = jnp.asarray(r.normal(size=(t, d)), jnp.float32)
  w_in, w_gate, w_out = (jnp.asarray(r.normal(size=s) / 3, jnp.float32)
                         for s in ((e, d, f), (e, d, f), (e, f, d)))
  idx = jnp.asarray(skewed_idx(6, t, e, 2), jnp.int32)
  gates = jax.nn.softmax(jnp.asarray(r.normal(size=(t, 2)), jnp.float32))
  # 4 sequences of 8 tokens: each keeps its own capacity, wherever its shard is.
  keep = capacity_keep(idx.reshape(4, 8, 2), e, capacity_factor=factor).reshape(t, 2)
  ref = dense_experts(x, w_in, w_gate, w_out, gates, idx, keep_TxK=keep)
  with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))):
    y, (done, expert, rows) = jax.jit(lambda *a: (
        expert_parallel_experts(*a, keep_TxK=keep), pair_counts(a[-1], e, keep)))(
            x, w_in, w_gate, w_out, gates, idx)
  return {"factor": factor, "num_experts": e, "idx": np.asarray(idx).tolist(),
          "keep": np.asarray(keep).tolist(), "done": np.asarray(done).tolist(),
          "expert": np.asarray(expert).tolist(), "rows": int(rows), "y": rel_err(y, ref)}


def eval_on_meshes():
  """evaluate_variants on each of EVAL_MESHES vs one device, 13 windows in batches of 3 (rounded
  up to the batch shards, the last one padded): per variant the largest relative difference of
  each float metric, and whether the rest (routing shares, counts, bytes) are equal."""
  windows = np.random.default_rng(5).integers(0, 64, size=(13, SEQ + 1)).astype(np.int32)
  out = []
  for name, sizes, dispatch in EVAL_MESHES:
    changes, codes = MODELS[name]
    # Two layers: the second one's routing reads the quantized experts of the first.
    cfg = model_config({**changes, "num_layers": 2})
    _, teacher, quant = _init(cfg)
    variants = {"full_precision": {"params": teacher},
                "student": {"params": teacher, "quant": set_expert_codes(quant, np.asarray(codes * 2))}}
    ref = evaluate_variants(cfg, variants, windows, 3)
    mesh_cfg = cfg.replace(dispatch=dispatch)
    got = evaluate_variants(mesh_cfg, variants, windows, 3,
                            placement=eval_placement(MeshConfig(**sizes), mesh_cfg))
    entry = {"model": name, "sizes": sizes, "dispatch": dispatch,
             "student_topk_agree": ref["student"]["topk_agree"], "rel": {}, "equal": {}}
    for variant, metrics in ref.items():
      for key, want in metrics.items():
        if isinstance(want, float) or key.endswith("_per_layer"):
          entry["rel"][f"{variant}.{key}"] = rel_err(got[variant][key], want)
        else:
          entry["equal"][f"{variant}.{key}"] = got[variant][key] == want
    out.append(entry)
  return out


def ep_errors():
  """The one-line errors of model.dispatch="ep" on an expert=4 x data=2 mesh (traced, not run)."""
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  idx = lambda t: jax.ShapeDtypeStruct((t, 2), jnp.int32)
  cases = {"tokens": (f32(12, 4), f32(8, 4, 4), f32(8, 4, 4), f32(8, 4, 4), f32(12, 2), idx(12)),
           "experts": (f32(16, 4), f32(6, 4, 4), f32(6, 4, 4), f32(6, 4, 4), f32(16, 2), idx(16))}
  out = {}
  with jax.set_mesh(make_mesh(MeshConfig(data=2, expert=4))):
    for name, args in cases.items():
      try:
        jax.eval_shape(expert_parallel_experts, *args)
        out[name] = None
      except ValueError as e:
        out[name] = str(e)
  return out


def rel_err(a, b):
  """max |a - b| over max |b|: the error relative to the array's own scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def compare(ref, got):
  (ref_hist, ref_state), (hist, state) = ref, got
  out = {"metrics": {k: max(abs(h[k] - r[k]) / max(abs(r[k]), 1e-30)
                            for h, r in zip(hist, ref_hist)) for k in ref_hist[0]}}
  out["params"] = {jax.tree_util.keystr(path): rel_err(a, b) for (path, a), b in zip(
      jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ref_state.params))}
  out["stats"] = {k: rel_err(state.stats[k], ref_state.stats[k]) for k in ref_state.stats}
  return out


def shard_facts(state, sizes):
  """Shard shapes that show the state was created in its shardings, not replicated."""
  moe = state.params["layers_0"]["moe"]
  nu = state.opt_state[1][0].nu["layers_0"]["moe"]["w_in"]
  return {"w_in_global": list(moe["w_in"].shape),
          "w_in_shard": list(moe["w_in"].addressable_shards[0].data.shape),
          "nu_w_in_shard": list(nu.addressable_shards[0].data.shape),
          "teacher_w_in_shard": list(
              state.teacher_params["layers_0"]["moe"]["w_in"].addressable_shards[0].data.shape),
          "quant_replicated": all(x.sharding.is_fully_replicated
                                  for x in jax.tree.leaves(state.quant)),
          "sizes": sizes}


# A checkpoint that moves between meshes: the data=8 state is saved, then restored and stepped
# once more on expert=4 x data=2 and on one device, with the steps compiled above (no new compile).
SAVED_ON, MOVED_TO = (8, 1, 1, 1), (2, 1, 4, 1)


def resume_once(folder, template, step, place):
  """run_training from the checkpoint in `folder` for one more step: (restored params, metrics)."""
  ckpt = Checkpointer(folder / "ckpt", 0)
  restored = jax.device_get(ckpt.restore(template).params)  # into the template's shardings
  loop = LoopConfig(steps=int(ckpt.latest_step()) + 1, batch_size=BATCH, seq_len=SEQ, seed=0,
                    log_every=1, ckpt_every=0)
  ckpt.close()
  history = []
  tokens = np.random.default_rng(1).integers(0, 64, size=4000).astype(np.int32)
  run_training(template, step, tokens, loop, folder, resume=True, desc="moved", placement=place,
               on_step=lambda i, m: history.append(m))
  return restored, history[-1]


def moves(tmp, live):
  """Saved on data=8; restored on expert=4 x data=2 and on one device (identical params); the
  next step's metrics from both."""
  state, _, _ = live[SAVED_ON]
  saver = Checkpointer(tmp / "saved" / "ckpt", 0)
  saver.save(state, force=True)
  saver.close()
  # For the pytest process (one device) to restore: the params as saved.
  np.savez(tmp / "saved" / "params.npz", *jax.tree.leaves(jax.device_get(state.params)))
  out = {}
  for name, key in (("mesh", MOVED_TO), ("one_device", None)):
    shutil.copytree(tmp / "saved", tmp / name)
    template, step, place = live[key]
    restored, metrics = resume_once(tmp / name, template, step, place)
    out[name] = metrics
    out[f"{name}_params"] = [np.asarray(x) for x in jax.tree.leaves(restored)]
  saved = jax.tree.leaves(jax.device_get(state.params))
  out["params_identical"] = all(
      np.array_equal(a, b) and np.array_equal(a, c)
      for a, b, c in zip(saved, out.pop("mesh_params"), out.pop("one_device_params")))
  out["step"] = int(state.step) + 1
  return out


# A Switch Transformer (encoder-decoder, top-1 routing with Switch's expert capacity) on meshes vs
# one device: the seq2seq QAT step, then the pipeline's own pretrain + qat on a mesh.
SWITCH_MESHES = [dict(data=2, expert=4), dict(data=4, tensor=2)]


def _switch_cfg():
  from moeqjax.model import SwitchConfig
  return SwitchConfig(vocab_size=64, d_model=32, d_kv=8, num_heads=4, d_ff=32, num_layers=2,
                      num_decoder_layers=1, num_sparse_encoder_layers=1,
                      num_sparse_decoder_layers=1, num_experts=8, expert_capacity=3,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16,
                      router_jitter=0.0, quant=QuantRules(expert_code=1, granularity="channel"))


def _switch_batch(step):
  r = np.random.default_rng(step)
  dec = r.integers(1, 64, (BATCH, 5))
  mask = np.ones((BATCH, 9), bool)
  mask[::3, 6:] = False  # padded sources
  return {"encoder_ids": r.integers(1, 64, (BATCH, 9)).astype(np.int32),
          "decoder_ids": dec.astype(np.int32),
          "targets": np.roll(dec, -1, axis=1).astype(np.int32),
          "target_mask": np.ones((BATCH, 5), bool), "encoder_mask": mask}


def switch_run(mesh_cfg):
  """3 seq2seq QAT steps from one teacher (mixed codes, every objective term): (metrics, state)."""
  from moeqjax.model import default_quant, init_switch, SwitchTransformer
  from moeqjax.train import jit_seq2seq_step
  cfg = _switch_cfg()
  _, teacher, _ = init_switch(cfg, jax.random.key(0))
  quant = set_expert_codes(default_quant(cfg), np.asarray([[1, 2, 4, 8, 0, 3, 1, 2],
                                                           [2, 1, 3, 0, 8, 4, 1, 1]]))
  tx = make_optimizer(OPTIM)
  build = lambda s, q, f: create_state(jax.tree.map(jnp.copy, s), tx, None, quant=q,
                                       teacher_params=f)
  place = None
  if mesh_cfg is None:
    state = jax.jit(build)(teacher, quant, teacher)
  else:
    place = placement(mesh_cfg, cfg, jax.eval_shape(build, teacher, quant, teacher), BATCH)
    state = init_sharded(build, place.state, teacher, quant, teacher)
  step = jit_seq2seq_step(SwitchTransformer(cfg), tx, WEIGHTS, placement=place)
  history = []
  for i in range(STEPS):
    batch = _switch_batch(i)
    if place is not None:
      batch = place.put_batch(batch)
    state, metrics = step(state, batch, jax.random.key(i))
    history.append({k: float(v) for k, v in metrics.items()})
  return history, state


def switch_pipeline(tmp):
  """`moeqjax pretrain` and `qat` of a tiny Switch config on the 8 devices (mesh data=2 x
  expert=4): the runs finish, and the state's experts are split over the expert axis."""
  from moeqjax.cli import main as cli_main
  from moeqjax.pipeline import switch_phases
  from moeqjax.pipeline.config import load_config
  repo = pathlib.Path(__file__).resolve().parents[2]
  sys.path.insert(0, str(repo / "tests"))
  from switch_micro import micro_config  # pylint: disable=import-outside-toplevel
  (tmp / "switch.py").write_text(micro_config(3, 2))
  mesh = ["--config.mesh.data=2", "--config.mesh.expert=4", "--config.model.num_experts=8",
          "--config.pretrain.warmup_steps=1", "--config.qat.warmup_steps=1"]
  rcs = [cli_main(["pretrain", "--config", str(tmp / "switch.py"), "--workdir",
                   str(tmp / "sw_pre"), *mesh])]
  rcs.append(cli_main(["qat", "--teacher", str(tmp / "sw_pre"), "--workdir", str(tmp / "sw_qat")]))
  from moeqjax.pipeline.workdirs import load_data
  config = load_config(tmp / "switch.py")
  with config.unlocked():
    config.mesh.data, config.mesh.expert, config.model.num_experts = 2, 4, 8
    config.pretrain.warmup_steps = 1
  # The finished run, restored into its shardings on this mesh.
  teacher = switch_phases.pretrain(config, tmp / "sw_pre", load_data(config), resume=True)
  w_in = teacher.params["encoder"]["layers_0"]["moe"]["w_in"]
  metrics = [json.loads(line) for line in (tmp / "sw_qat" / "metrics.jsonl").read_text().splitlines()]
  return {"rcs": rcs, "w_in_global": list(w_in.shape),
          "w_in_shard": list(w_in.addressable_shards[0].data.shape),
          "qat_losses": [m["train/loss"] for m in metrics]}


def switch_on_meshes(tmp):
  ref_hist, ref_state = switch_run(None)
  ref_state = jax.device_get(ref_state)
  out = []
  for sizes in SWITCH_MESHES:
    hist, state = switch_run(MeshConfig(**sizes))
    got = jax.device_get(state)
    # Per param: how many elements are off by more than 1e-5 of the param's scale (see the test).
    off = {jax.tree_util.keystr(path): int(np.sum(
        np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        > 1e-5 * max(np.max(np.abs(np.asarray(b, np.float64))), 1e-30)))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got.params),
                                jax.tree.leaves(ref_state.params))}
    out.append({"sizes": sizes, **compare((ref_hist, ref_state), (hist, got)), "params_off": off,
                "w_in_shard": list(state.params["encoder"]["layers_1"]["moe"]["w_in"]
                                   .addressable_shards[0].data.shape),
                "drop_rate": [h.get("train/drop_rate") for h in hist]})
  return {"steps": out, "pipeline": switch_pipeline(tmp)}


def main():
  t0 = time.perf_counter()
  results, refs = [], {}
  live = {}  # sizes (None: one device) -> (state, step, placement) of the mixtral runs
  for name, sizes, dispatch in MESHES:
    changes, codes = MODELS[name]
    cfg = model_config(changes)
    if name not in refs:
      hist, state, step, _, _ = run(cfg, codes, None)
      refs[name] = (hist, jax.device_get(state))
      if name == "mixtral":
        live[None] = (state, step, None)
    mesh_cfg = MeshConfig(**sizes)
    hist, state, step, batch, place = run(cfg.replace(dispatch=dispatch), codes, mesh_cfg)
    entry = {"model": name, "dispatch": dispatch,
             "drop_rate": [h.get("train/drop_rate") for h in hist],
             "clip_params": sorted(k for k in state.params["layers_0"]["moe"] if "clip" in k),
             **compare(refs[name], (hist, jax.device_get(state))),
             **shard_facts(state, mesh_cfg.sizes(len(jax.devices())))}
    entry["cache_before"] = step._cache_size()
    # A new allocation on the mesh is new data for the same compiled step.
    new_codes = np.roll(np.asarray(codes), 1, axis=1)
    state = with_quant(state, set_expert_codes(jax.device_get(state.quant), new_codes))
    state, _ = step(state, batch, jax.random.key(9))
    entry["cache_after"] = step._cache_size()
    results.append(entry)
    if name == "mixtral":
      live[tuple(entry["sizes"][a] for a in ("data", "fsdp", "expert", "tensor"))] = (
          state, step, place)
  moved = moves(pathlib.Path(sys.argv[1]), live)
  t_ep = time.perf_counter()
  ep = [ep_block(*block) for block in EP_BLOCKS]
  ep_seconds = time.perf_counter() - t_ep
  # The mesh steps after a restore into their shardings (the one-device step above was first
  # compiled outside run_training, whose committed batches it has not seen).
  moved["cache_sizes"] = [step._cache_size() for _, step, place in live.values() if place]
  print(json.dumps({"devices": len(jax.devices()), "seconds": time.perf_counter() - t0,
                    "results": results, "moves": moved, "ep_blocks": ep,
                    "ep_seconds": ep_seconds, "ep_errors": ep_errors(),
                    "ep_capacity": ep_capacity(), "eval": eval_on_meshes(),
                    "switch": switch_on_meshes(pathlib.Path(sys.argv[1]))}))


if __name__ == "__main__":
  sys.exit(main())
