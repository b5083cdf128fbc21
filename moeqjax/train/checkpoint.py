"""Orbax checkpoints of the train state, with resume."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from moeqjax.train.state import TrainState


def _as_tree(state: TrainState) -> dict:
  # A plain dict keeps checkpoints readable without this dataclass and drops None fields.
  tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "stats": state.stats}
  if state.quant is not None:
    tree["quant"] = state.quant
  if state.teacher_params is not None:
    tree["teacher_params"] = state.teacher_params
  return tree


def restore_target(tree):
  """Orbax's restore target for a tree of arrays or ShapeDtypeStructs: each leaf keeps its
  sharding, and a leaf without one goes to this process's first device.

  Without a sharding orbax would use the one recorded at save time, which fails on another device
  count ("Topology mismatch"): a run trained on 8 devices is then read on one, and vice versa.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def leaf(x):
    x = ocp.utils.to_shape_dtype_struct(x)
    if getattr(x, "sharding", None) is None:
      x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
    return x

  return jax.tree.map(leaf, tree)


class Checkpointer:
  """Saves the state every `every` steps (and on demand), keeping the newest `keep`."""

  def __init__(self, directory: str | pathlib.Path, every: int, keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: TrainState, force: bool = False) -> bool:
    step = int(state.step)
    if step in self.manager.all_steps():
      return False
    if not force and (self.every <= 0 or step % self.every):
      return False
    self.manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=True)
    self.manager.wait_until_finished()
    return True

  def restore(self, template: TrainState, step: int | None = None) -> TrainState:
    """Restores into the structure, shapes and dtypes of `template`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    target = restore_target(_as_tree(template))
    tree = self.manager.restore(step, args=ocp.args.StandardRestore(target))
    return template.replace(**tree)

  def close(self):
    self.manager.close()
