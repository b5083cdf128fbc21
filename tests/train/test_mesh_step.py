"""The sharded QAT step on 8 CPU devices equals the single-device step; mesh errors name the fix."""

import pathlib

import jax
import numpy as np
import pytest

import mesh_launch
from capacity_oracle import reference_keep
from moeqjax.model import init_model
from moeqjax.train import Checkpointer
from moeqjax.train.mesh import MeshConfig, MeshError, check_batch, check_params
from moeqjax.model.transformer import param_axes
from conftest import tiny_model_config

RTOL = 1e-5
# Key-projection biases: softmax is invariant to a per-query shift of the scores, so their exact
# gradient is zero up to RoPE's rotation and is computed as a difference of nearly equal sums.
# Adam scales any gradient to a step of about the learning rate, so the summation order (which
# a sharded reduction changes) moves them by up to ~1e-4 of their size after 3 steps (measured
# 4e-5); every other parameter is held to RTOL.
RTOL_K_BIAS = 2e-4
EXPECTED = {  # sizes -> (w_in shard shape) for E=8 (mixtral) or E=4 (qwen2moe), D=F=32
    (8, 1, 1, 1): [8, 32, 32], (2, 4, 1, 1): [8, 8, 32], (2, 1, 4, 1): [2, 32, 32],
    (2, 1, 2, 2): [2, 32, 16], (4, 1, 1, 2): [8, 32, 16],
}


@pytest.fixture(scope="module")
def mesh_out():
  out = mesh_launch.background_json("mesh")
  yield out
  mesh_launch.forget("mesh")


def test_sharded_steps_equal_single_device(mesh_out):
  out = mesh_out
  print(f"mesh child: {out['seconds']:.1f} s inside, {out['wall_s']:.1f} s wall")
  assert out["devices"] == 8
  seen = set()
  for r in out["results"]:
    sizes = tuple(r["sizes"][a] for a in ("data", "fsdp", "expert", "tensor"))
    seen.add((r["model"], sizes))
    for key, err in r["metrics"].items():
      assert err <= RTOL, (r["model"], sizes, key, err)
    for key, err in r["stats"].items():
      assert err <= RTOL, (r["model"], sizes, key, err)
    for path, err in r["params"].items():
      assert err <= (RTOL_K_BIAS if "k_proj']['bias" in path else RTOL), (sizes, path, err)
    # Created in its shardings: the student, the teacher and Adam's moments are split alike.
    assert r["w_in_shard"] == r["nu_w_in_shard"] == r["teacher_w_in_shard"] == EXPECTED[sizes]
    assert r["quant_replicated"]
    assert r["cache_before"] == r["cache_after"] == 1, "a new allocation recompiled on a mesh"
  assert seen == {("mixtral", (8, 1, 1, 1)), ("mixtral", (2, 4, 1, 1)),
                  ("mixtral", (2, 1, 4, 1)), ("mixtral", (4, 1, 1, 2)), ("qwen2moe", (2, 1, 2, 2)),
                  ("mixtral_clip", (2, 1, 4, 1)), ("mixtral_cap", (2, 1, 4, 1))}
  # The expert-parallel exchange (shard_map) ran two of them: their loss, metric terms (routing
  # alignment included), params and router statistics are among those checked above.
  assert [r["model"] for r in out["results"] if r["dispatch"] == "ep"] == ["qwen2moe",
                                                                           "mixtral_cap"]
  assert {k for r in out["results"] for k in r["metrics"]} >= {
      "train/task", "train/rec", "train/kd", "train/value", "train/struct", "train/lb",
      "train/z", "train/loss", "train/grad_norm"}


def test_expert_parallel_block_equals_dense_oracle(mesh_out):
  """model.dispatch="ep" (tokens sent to their experts' shards and back) vs the dense oracle on one
  device: forward and every gradient within RTOL, and each (token, k) pair computed exactly once."""
  print(f"EP blocks: {mesh_out['ep_seconds']:.1f} s inside the mesh child")
  seen = set()
  for r in mesh_out["ep_blocks"]:
    where = (r["model"], r["sizes"], r["act_bits"])
    seen.add((r["model"], r["sizes"].get("expert"), r["act_bits"]))
    assert r["same_routing"], where
    assert r["loss"] <= RTOL and r["y"] <= RTOL, (where, r["loss"], r["y"])
    assert r["grads"] and max(r["grads"].values()) <= RTOL, (where, r["grads"])
    # Dropless: every pair came back from its own expert, and no shard ran a row twice.
    assert r["pairs_done_once"] and r["pairs_by_own_expert"], where
    assert r["rows_computed"] == r["pairs"], where
  assert seen == {("mixtral", 4, 0), ("qwen2moe", 2, 8)}
  # T*k pairs: 16 x 8 tokens, k=2 (E=8) and k=1 (E=4).
  assert {r["pairs"] for r in mesh_out["ep_blocks"]} == {16 * 8 * 2, 16 * 8 * 1}


def test_expert_parallel_capacity_drops_by_the_reference_rule(mesh_out):
  """With model.capacity_factor the EP exchange sends only the kept pairs (the loop's rule, per
  sequence of 8 tokens), each to its own expert once, and equals the dense oracle."""
  r = mesh_out["ep_capacity"]
  keep = reference_keep(r["idx"], r["num_experts"], r["factor"], seq_len=8)
  assert 0 < (~keep).sum() and np.array_equal(r["keep"], keep)
  assert np.array_equal(r["done"], keep.astype(int))
  assert np.array_equal(r["expert"], np.where(keep, r["idx"], -1))
  assert r["rows"] == keep.sum()  # dropped pairs were not sent, nor computed
  assert r["y"] <= RTOL, r["y"]


def test_expert_parallel_errors_name_the_fix(mesh_out):
  errors = mesh_out["ep_errors"]
  assert errors["tokens"] == (
      "model.dispatch='ep': 12 tokens do not split over the 8 token shards (data=2 x fsdp=1 x "
      "expert=4); use a batch that is a multiple of 8")
  assert errors["experts"] == ("model.num_experts = 6 is not divisible by expert = 4; choose "
                               "mesh sizes that divide it")


def test_checkpoint_moves_between_meshes(mesh_out):
  """Saved on data=8, restored on expert=4 x data=2 and on one device: identical params; the
  next step's metrics agree, and no step compiled again (restored leaves keep the shardings)."""
  moved = mesh_out["moves"]
  assert moved["params_identical"]
  assert moved["step"] == 5  # 3 steps + 1 with a new allocation, saved; this is the next one
  assert set(moved["mesh"]) >= {"train/loss", "train/task", "train/kd", "train/rec"}
  for key, value in moved["one_device"].items():
    assert abs(moved["mesh"][key] - value) <= RTOL * abs(value), (key, moved["mesh"][key], value)
  assert moved["cache_sizes"] == [1, 1, 1, 1]


def test_a_mesh_checkpoint_restores_on_one_device_from_a_shape_only_template(mesh_out):
  """The data=8 checkpoint, restored in this one-device process into a template with no
  shardings (jax.eval_shape, as `eval`, `pack` and `generate` restore): orbax would otherwise use
  the 8-device shardings recorded at save time ("Topology mismatch")."""
  import mesh_child
  cfg = mesh_child.model_config(mesh_child.MODELS["mixtral"][0])
  template = mesh_child.abstract_state(cfg)
  assert all(getattr(x, "sharding", None) is None for x in jax.tree.leaves(template))
  saved = pathlib.Path(mesh_out["scratch"]) / "saved"
  ckpt = Checkpointer(saved / "ckpt", 0)
  try:
    state = ckpt.restore(template)
  finally:
    ckpt.close()
  with np.load(saved / "params.npz") as npz:
    want = [npz[f"arr_{i}"] for i in range(len(npz.files))]
  got = jax.tree.leaves(state.params)
  assert len(got) == len(want) > 0
  assert all(np.array_equal(np.asarray(a), b) for a, b in zip(got, want))
  assert {x.sharding.device_set.pop() for x in got} == {jax.devices()[0]}


def test_mesh_sizes_must_match_the_devices():
  assert MeshConfig().sizes(8) == {"data": 8, "fsdp": 1, "expert": 1, "tensor": 1}
  assert MeshConfig(data=2, expert=-1).sizes(8)["expert"] == 4
  with pytest.raises(MeshError, match=r"mesh data=2 x fsdp=2 x expert=1 x tensor=1 has 4 "
                     r"devices but 8 are present; make the product 8"):
    MeshConfig(data=2, fsdp=2).sizes(8)
  with pytest.raises(MeshError, match="product 3 does not divide the 8 devices"):
    MeshConfig(expert=3).sizes(8)
  with pytest.raises(MeshError, match="more than one -1"):
    MeshConfig(fsdp=-1)
  with pytest.raises(MeshError, match="mesh.tensor=0 must be >= 1"):
    MeshConfig(tensor=0)


def test_unknown_mesh_axis_in_rules():
  with pytest.raises(MeshError, match=r"maps 'mlp' to unknown mesh axis 'model'; use some of "
                     "data, fsdp, expert, tensor"):
    MeshConfig(logical_axis_rules=(("mlp", "model"),))


def test_experts_and_batch_must_divide():
  cfg = tiny_model_config()  # E=4
  params = jax.eval_shape(lambda: init_model(cfg, jax.random.key(0))[1])
  config = MeshConfig(data=1, expert=8)
  with pytest.raises(MeshError, match=r"model.num_experts = 4 is not divisible by expert = 8 "):
    check_params(config, config.sizes(8), params, param_axes(cfg))
  config = MeshConfig(data=2, expert=2)
  check_params(config, config.sizes(4), params, param_axes(cfg))  # 4 experts over 2: fine
  with pytest.raises(MeshError, match=r"batch_size=6 is not divisible by the 4 batch shards "
                     r"\(data=2 x fsdp=1 x expert=2\); use a multiple of 4"):
    check_batch(config, config.sizes(4), 6)
  check_batch(config, config.sizes(4), 8)


def test_options_on_a_mesh(mesh_out):
  """Learned clip ratios (student params the teacher lacks) and an expert capacity, each alone,
  in the full sharded QAT step: held to the single-device step above; here, that they were on."""
  runs = {r["model"]: r for r in mesh_out["results"]}
  assert runs["mixtral_clip"]["clip_params"] == ["w_gate_clip", "w_in_clip", "w_out_clip"]
  assert any("_clip" in path for path in runs["mixtral_clip"]["params"])  # compared above
  assert runs["mixtral"]["clip_params"] == []
  drops = runs["mixtral_cap"]["drop_rate"]
  assert all(0 < d < 1 for d in drops), drops  # the capacity dropped pairs on every step
  assert "train/drop_rate" in runs["mixtral_cap"]["metrics"]  # equal to one device's: above
  assert runs["mixtral"]["drop_rate"] == [None] * 3


def test_evaluation_on_a_mesh_equals_one_device(mesh_out):
  """evaluate_variants with an eval placement (expert-parallel, tensor-parallel, the Qwen2-MoE
  style model with its shared expert) vs one device: every float metric within RTOL (bits per
  token and window, routing agreement per layer, load KL), the rest equal."""
  seen = set()
  for r in mesh_out["eval"]:
    where = (r["model"], r["sizes"], r["dispatch"])
    seen.add((r["model"], r["dispatch"]))
    assert r["rel"] and max(r["rel"].values()) <= RTOL, (where, r["rel"])
    assert r["equal"] and all(r["equal"].values()), (where, r["equal"])
    assert {"student.nll", "student.topk_agree_per_layer", "full_precision.load_kl"} <= set(r["rel"])
    assert {"student.expert_load", "student.expert_bytes", "student.eval_tokens"} <= set(r["equal"])
    assert r["student_topk_agree"] < 1.0, where  # the student routes differently somewhere
  assert seen == {("mixtral", "ep"), ("mixtral", "ragged"), ("qwen2moe", "ep")}


# A Switch Transformer's sharded step: one element of an int4 expert's w_out moved by 4.2e-5 of the
# param's scale after 3 steps (1 of 1,024; identical after step 1), the other 1,023 within 1e-7. As
# for the key biases above, Adam scales a gradient that is a difference of nearly equal sums to a
# step of about the learning rate, so the summation order a sharded reduction changes shows there.
# Such elements are counted: at most 2 per param may exceed RTOL, by at most RTOL_ADAM.
RTOL_ADAM = 2e-4


def test_switch_sharded_steps_equal_single_device_and_the_pipeline_runs_on_a_mesh(mesh_out):
  """The seq2seq QAT step (every objective term, Switch's capacity, padded sources, mixed codes) on
  data=2 x expert=4 and data=4 x tensor=2 equals the single-device step; `moeqjax pretrain` and
  `qat` of a Switch config run on the mesh their config names, experts split over its expert axis."""
  out = mesh_out["switch"]
  assert [s["sizes"] for s in out["steps"]] == [dict(data=2, expert=4), dict(data=4, tensor=2)]
  for s in out["steps"]:
    where = s["sizes"]
    for key, err in s["metrics"].items():
      assert err <= RTOL, (where, key, err)
    for key, err in s["stats"].items():
      assert err <= RTOL, (where, key, err)
    for path, err in s["params"].items():
      assert err <= RTOL_ADAM and s["params_off"][path] <= 2, (where, path, err)
    assert sum(s["params_off"].values()) <= 4, where
    assert min(s["drop_rate"]) > 0  # the capacity dropped tokens: the per-sequence rule ran
  # experts split 4 ways on the expert axis (8 experts -> 2 a shard); tensor=2 splits their mlp
  assert out["steps"][0]["w_in_shard"] == [2, 32, 32] and out["steps"][1]["w_in_shard"] == [8, 32, 16]
  pipe = out["pipeline"]
  assert pipe["rcs"] == [0, 0] and pipe["w_in_global"] == [8, 32, 64]
  assert pipe["w_in_shard"] == [2, 32, 64]  # restored into the config's mesh
  assert len(pipe["qat_losses"]) >= 1 and all(np.isfinite(pipe["qat_losses"]))
