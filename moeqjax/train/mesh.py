"""Device meshes from axis sizes, checked against the devices, the model and the batch (MaxText-style rules)."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH = "batch"  # the logical name of the batch axis in the rules

# Logical names (as the model's nn.with_logical_partitioning uses them) -> mesh axes. Flax reads
# them by priority: the first rule whose mesh axes are still free in that array wins.
DEFAULT_RULES = (
    (BATCH, ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("head_dim", None),
)

# What a user changes to make a logical axis divisible (error messages only).
_CONFIG_FIELD = {"expert": "model.num_experts", "embed": "model.d_model", "mlp": "model.d_ff",
                 "vocab": "model.vocab_size", "heads": "model.num_heads * model.head_dim",
                 "kv": "model.num_kv_heads * model.head_dim"}


class MeshError(ValueError):
  """A mesh that does not fit the devices, the model or the batch; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes (-1 = the devices left over; at most one) and logical-axis rules."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  logical_axis_rules: tuple = DEFAULT_RULES

  def __post_init__(self):
    rules = tuple((str(name), axes_tuple(axes)) for name, axes in self.logical_axis_rules)
    object.__setattr__(self, "logical_axis_rules", rules)
    for name, axes in rules:
      for axis in axes:
        if axis not in MESH_AXES:
          raise MeshError(f"mesh.logical_axis_rules maps {name!r} to unknown mesh axis {axis!r}; "
                          f"use some of {', '.join(MESH_AXES)} (or None)")
    sizes = {a: getattr(self, a) for a in MESH_AXES}
    if [a for a, n in sizes.items() if n == -1][1:]:
      raise MeshError(f"mesh sizes {sizes} have more than one -1; give all but one axis a size")
    for axis, n in sizes.items():
      if n != -1 and n < 1:
        raise MeshError(f"mesh.{axis}={n} must be >= 1, or -1 for the devices left over")

  def fixed_devices(self) -> int:
    """The product of the sizes that are not -1: the smallest device count this mesh fits."""
    return math.prod(n for n in (getattr(self, a) for a in MESH_AXES) if n != -1)

  def sizes(self, num_devices: int) -> dict[str, int]:
    """Axis sizes with -1 resolved for `num_devices`; raises MeshError when they cannot fit."""
    sizes = {a: getattr(self, a) for a in MESH_AXES}
    fixed = self.fixed_devices()
    given = " x ".join(f"{a}={n}" for a, n in sizes.items())
    free = [a for a, n in sizes.items() if n == -1]
    if free:
      if num_devices % fixed:
        raise MeshError(f"mesh {given}: the fixed axes' product {fixed} does not divide the "
                        f"{num_devices} devices; choose sizes whose product divides {num_devices}")
      sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
      raise MeshError(f"mesh {given} has {fixed} devices but {num_devices} are present; make the "
                      f"product {num_devices} (or set one axis to -1)")
    return sizes

  def batch_axes(self) -> tuple[str, ...]:
    """The mesh axes the batch rows are split over (the first `batch` rule)."""
    return next((axes for name, axes in self.logical_axis_rules if name == BATCH), ())


def axes_tuple(axes) -> tuple[str, ...]:
  """A rule's or flax's mesh axes (None, a name or a sequence of names) as a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def flax_rules(config: MeshConfig) -> tuple:
  """The rules in flax's form (None, one axis name or a tuple of them)."""
  return tuple((name, None if not axes else axes[0] if len(axes) == 1 else axes)
               for name, axes in config.logical_axis_rules)


def check_batch(config: MeshConfig, sizes: dict[str, int], batch_size: int, what="batch_size"):
  """The global batch must split evenly over the batch's mesh axes."""
  axes = config.batch_axes()
  shards = batch_shards(config, sizes)
  if batch_size % shards:
    raise MeshError(f"{what}={batch_size} is not divisible by the {shards} batch shards "
                    f"({' x '.join(f'{a}={sizes[a]}' for a in axes)}); use a multiple of {shards}")


def check_params(config: MeshConfig, sizes: dict[str, int], abstract_params, logical_specs):
  """Every sharded parameter dimension must be divisible by its mesh axes' product."""
  rules = flax_rules(config)
  flat_specs = jax.tree_util.tree_leaves_with_path(
      logical_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
  shapes = dict(jax.tree_util.tree_leaves_with_path(abstract_params))
  for path, spec in flat_specs:
    mesh_axes = nn.logical_to_mesh_axes(tuple(spec), rules)
    shape = shapes[path].shape
    for dim, (name, axes) in enumerate(zip(spec, mesh_axes)):
      n = math.prod(sizes[a] for a in axes_tuple(axes))
      if shape[dim] % n:
        field = _CONFIG_FIELD.get(name, f"the {name!r} dimension")
        raise MeshError(
            f"{field} = {shape[dim]} is not divisible by {' x '.join(axes_tuple(axes))} = {n} "
            f"(parameter {jax.tree_util.keystr(path)}); choose mesh sizes that divide it")


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
  """The device mesh over `devices` (default: all), axes in MESH_AXES order."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = config.sizes(len(devices))
  return Mesh(np.asarray(devices).reshape([sizes[a] for a in MESH_AXES]), MESH_AXES)


def logical_shardings(config: MeshConfig, mesh: Mesh, logical_specs):
  """A tree of logical PartitionSpecs -> the same tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, flax_rules(config))


def traced_in_mesh(fn, mesh: Mesh):
  """fn traced with `mesh` as the context (abstract) mesh, which the model's shard_map reads
  (model.dispatch="ep")."""
  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)
  return traced


def batch_shards(config: MeshConfig, sizes: dict[str, int]) -> int:
  """How many row blocks the batch is split into (the product of its mesh axes' sizes)."""
  return math.prod(sizes[a] for a in config.batch_axes())


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(config: MeshConfig, mesh: Mesh) -> NamedSharding:
  """Rows of a [B, ...] batch split over the batch's mesh axes."""
  axes = config.batch_axes()
  return NamedSharding(mesh, PartitionSpec(axes if axes else None))
