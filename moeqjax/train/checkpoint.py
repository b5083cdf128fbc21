"""Orbax checkpoints of the train state, with resume."""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from moeqjax.train.state import TrainState


ITEM = "default"  # the folder of a step's one item, as CheckpointManager names it
_FIELDS = ("step", "params", "opt_state", "quant", "teacher_params", "stats")


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

  def restore(self, template: TrainState, step: int | None = None,
              parts: tuple[str, ...] | None = None) -> TrainState:
    """Restores into the structure, shapes, dtypes and shardings of `template`.

    Args:
      template: a state of arrays or ShapeDtypeStructs (see restore_target for leaves without a
        sharding).
      step: the step to restore (default: the latest).
      parts: restore only these fields (e.g. ("params", "quant")) and the step; the other fields
        come back None and are never read from disk, so reading a trained model does not hold its
        optimizer state (twice the params under Adam) or the teacher copy in memory. None: all.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    tree = _as_tree(template)
    if parts is None:
      restored = self.manager.restore(step, args=ocp.args.StandardRestore(restore_target(tree)))
      return template.replace(**restored)
    unknown = set(parts) - set(tree)
    if unknown:
      raise ValueError(f"no {sorted(unknown)} in this state; it has {sorted(tree)}")
    target = restore_target({k: tree[k] for k in ("step", *parts)})
    # The manager's handler restores whole trees only; a PyTree restore of the same item folder
    # with partial_restore reads just the arrays of `target`.
    restored = ocp.PyTreeCheckpointer().restore(
        self.directory / str(step) / ITEM,
        args=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(
            target), partial_restore=True))
    left_out = {k: None for k in _FIELDS if k not in restored}
    return template.replace(**left_out, **restored)

  def close(self):
    self.manager.close()
