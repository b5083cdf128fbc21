"""Where the train state and batches live on a mesh: shardings of every state leaf and sharded init."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import Mesh, NamedSharding

from moeqjax.model import ModelConfig, SwitchConfig, init_model, without_ratios
from moeqjax.model.switch import switch_param_axes
from moeqjax.model.transformer import param_axes
from moeqjax.train import mesh as mesh_lib
from moeqjax.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Placement:
  """The mesh, the state's shardings (a TrainState of NamedShardings) and the batch's."""

  mesh: Mesh
  state: TrainState
  batch: NamedSharding

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.state)

  def put_batch(self, batch):
    return jax.device_put(batch, self.batch)

  def batch_rows(self, batch_size: int) -> tuple[int, int]:
    """(i, n): this process's devices hold block i of n equal row blocks of the global batch.

    One process holds all rows, (0, 1). With several processes each feeds only its block, which
    is what `sample_batch(..., process_index=i, process_count=n)` draws.
    """
    index_map = self.batch.addressable_devices_indices_map((batch_size, 1))
    spans = sorted({idx[0].indices(batch_size)[:2] for idx in index_map.values()})
    lo, hi = spans[0]
    for start, stop in spans[1:]:
      hi = max(hi, stop) if start <= hi else -1  # -1: a gap between this process's rows
    if hi <= lo or batch_size % (hi - lo) or lo % (hi - lo):
      raise mesh_lib.MeshError(
          f"this process's devices hold batch rows {spans} of {batch_size}, not one block of "
          "equal blocks; order the devices so that each process's are adjacent on the batch axes")
    return lo // (hi - lo), batch_size // (hi - lo)

  def put_process_rows(self, rows, batch_size: int):
    """The global [batch_size, ...] array from this process's block of rows (batch_rows)."""
    return jax.make_array_from_process_local_data(self.batch, rows,
                                                  (batch_size, *rows.shape[1:]))


def matching_shardings(model_shardings, params):
  """Of the model's param shardings (every param of the config, learned ratios included), the
  tree for `params`: a student's (with learned ratio params when the config learns them) or a
  teacher's (never with them); `params` may be abstract."""
  want = jax.tree.structure(params)
  for candidate in (model_shardings, without_ratios(model_shardings)):
    if jax.tree.structure(candidate) == want:
      return candidate
  raise ValueError("these params do not match the model config's parameter tree")


def state_shardings(model_shardings, mesh: Mesh, abstract_state: TrainState) -> TrainState:
  """NamedShardings for every leaf of a (possibly abstract) state.

  Params and teacher follow the model's param shardings (`model_shardings`: its logical axes
  through the rules); optimizer-state subtrees shaped like the params (Adam's moments) follow the
  params; quant codes, router statistics, counters and the step are replicated (they are tiny,
  and codes stay traced data).
  """
  params = matching_shardings(model_shardings, abstract_state.params)
  rep = mesh_lib.replicated(mesh)
  params_def = jax.tree.structure(abstract_state.params)

  def like_params(subtree):
    return params if jax.tree.structure(subtree) == params_def else rep

  opt = jax.tree.map(like_params, abstract_state.opt_state,
                     is_leaf=lambda x: jax.tree.structure(x) == params_def)
  replicate = lambda tree: jax.tree.map(lambda _: rep, tree)
  return TrainState(
      step=rep, params=params, opt_state=opt, quant=replicate(abstract_state.quant),
      # The teacher never has learned ratios, also when the student learns them.
      teacher_params=(None if abstract_state.teacher_params is None else
                      matching_shardings(model_shardings, abstract_state.teacher_params)),
      stats=replicate(abstract_state.stats))


def model_param_axes(cfg):
  """Logical axes of every param of either model family (a ModelConfig or a SwitchConfig)."""
  return switch_param_axes(cfg) if isinstance(cfg, SwitchConfig) else param_axes(cfg)


def placement(config: mesh_lib.MeshConfig, cfg, abstract_state: TrainState,
              batch_size: int, devices=None) -> Placement:
  """The mesh over `devices` and the shardings of this state and batch, after checking that the
  mesh fits the devices, the model's parameter shapes and the global batch. `cfg`: a ModelConfig
  or a SwitchConfig (every leaf of a seq2seq batch dict is split by rows alike)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = config.sizes(len(devices))
  axes = model_param_axes(cfg)
  mesh_lib.check_params(config, sizes, abstract_state.params, axes)
  mesh_lib.check_batch(config, sizes, batch_size)
  mesh = mesh_lib.make_mesh(config, devices)
  model_shardings = mesh_lib.logical_shardings(config, mesh, axes)
  return Placement(mesh, state_shardings(model_shardings, mesh, abstract_state),
                   mesh_lib.batch_sharding(config, mesh))


def init_sharded(build, shardings: TrainState, *args) -> TrainState:
  """`build(*args)` compiled with out_shardings: every leaf is created in its own shards.

  Nothing is materialised whole on one device or the host (beyond what `args` already are).
  """
  return jax.jit(build, out_shardings=shardings)(*args)


@dataclasses.dataclass(frozen=True)
class EvalPlacement:
  """Where evaluation puts a model's variables (params in their shardings, quant codes replicated)
  and its windows (rows split over the batch axes) on a mesh."""

  mesh: Mesh
  params: dict  # the model's param shardings (see matching_shardings)
  batch: NamedSharding
  batch_shards: int

  def put_variables(self, variables: dict) -> dict:
    """`variables` ({"params"} or {"params", "quant"}) in their shardings (already-placed arrays
    stay where they are)."""
    rep = mesh_lib.replicated(self.mesh)
    shardings = {"params": matching_shardings(self.params, variables["params"])}
    if variables.get("quant") is not None:
      shardings["quant"] = jax.tree.map(lambda _: rep, variables["quant"])
    return jax.device_put({k: variables[k] for k in shardings}, shardings)

  def rows(self, batch_size: int) -> int:
    """`batch_size` rounded up to a multiple of the batch shards (padding rows are dropped)."""
    return -(-batch_size // self.batch_shards) * self.batch_shards

  def put_batch(self, batch):
    """A host array [B, ...], the same on every process, as a global array split by rows; each
    process copies only the rows of its own devices."""
    return jax.make_array_from_callback(batch.shape, self.batch, lambda index: batch[index])


def eval_placement(config: mesh_lib.MeshConfig, cfg: ModelConfig, devices=None) -> EvalPlacement:
  """The mesh of `config` over `devices` for evaluation, after checking that it fits the devices
  and the model's parameter shapes (evaluation pads its batch, so any batch size fits)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = config.sizes(len(devices))
  abstract = jax.eval_shape(lambda: init_model(cfg, jax.random.key(0))[1])
  axes = param_axes(cfg)
  mesh_lib.check_params(config, sizes, abstract, axes)
  mesh = mesh_lib.make_mesh(config, devices)
  return EvalPlacement(mesh, mesh_lib.logical_shardings(config, mesh, axes),
                       mesh_lib.batch_sharding(config, mesh), mesh_lib.batch_shards(config, sizes))
