"""Per-device bytes of a QAT state on a mesh, from shard shapes alone (no devices), and which axis to grow."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.sharding import PartitionSpec

from moeqjax.convert.plan import abstract_variables
from moeqjax.model import ModelConfig
from moeqjax.train.mesh import (MESH_AXES, MeshConfig, MeshError, axes_tuple, check_batch,
                                check_params, flax_rules)

_GIB = 2**30
GROWABLE = ("expert", "fsdp", "tensor")  # axes that split weights (data only splits the batch)


def _shapes_and_axes(cfg: ModelConfig):
  """(abstract params, logical PartitionSpecs) of a config, from one cached trace of its init."""
  boxed = abstract_variables(cfg)
  return meta.unbox(boxed)["params"], nn.get_partition_spec(boxed)["params"]


def shard_shape(shape, mesh_axes, sizes: dict[str, int]) -> tuple[int, ...]:
  """The largest shard of an array of `shape` split over `mesh_axes` (one entry per dim)."""
  out = []
  for n, axes in zip(shape, mesh_axes):
    out.append(-(-n // math.prod(sizes[a] for a in axes_tuple(axes))))
  return tuple(out)


def _tree_bytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def per_device_bytes(cfg: ModelConfig, mesh_cfg: MeshConfig, sizes: dict[str, int],
                     batch_size: int, seq_len: int, activation_bytes: int = 0) -> dict:
  """Bytes that one device holds for QAT on a mesh of `sizes` (largest shard of every array).

  params, teacher, gradients and each of Adam's two moments share the params' shardings (so
  their bytes per device are equal); quant codes are replicated; `activation_bytes` (the whole
  batch's estimate) is divided over the batch's mesh axes.
  """
  params, axes = _shapes_and_axes(cfg)
  rules = flax_rules(mesh_cfg)
  specs = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, PartitionSpec))
  shard = 0
  for leaf, spec in zip(jax.tree.leaves(params), specs):
    dims = shard_shape(leaf.shape, nn.logical_to_mesh_axes(tuple(spec), rules), sizes)
    shard += math.prod(dims) * np.dtype(leaf.dtype).itemsize
  codes = _tree_bytes(meta.unbox(abstract_variables(cfg))["quant"])
  batch_shards = math.prod(sizes[a] for a in mesh_cfg.batch_axes())
  rows = {"params": shard, "teacher": shard, "gradients": shard, "optimizer": 2 * shard,
          "codes": codes, "activations": -(-activation_bytes // batch_shards)}
  rows["total"] = sum(rows.values())
  return rows


def _grown(sizes: dict[str, int], axis: str) -> dict[str, int]:
  """`axis` doubled on the same devices (data halved), or on twice the devices when data is 1."""
  new = dict(sizes)
  new[axis] *= 2
  if new["data"] % 2 == 0:
    new["data"] //= 2
  return new


def check_mesh(cfg: ModelConfig, mesh_cfg: MeshConfig, sizes, batch_size: int,
               what="batch_size"):
  """MeshError unless the model's sharded dimensions and the batch divide over `sizes`."""
  check_params(mesh_cfg, sizes, *_shapes_and_axes(cfg))
  check_batch(mesh_cfg, sizes, batch_size, what)


def _valid(cfg: ModelConfig, mesh_cfg: MeshConfig, sizes, batch_size) -> bool:
  try:
    check_mesh(cfg, mesh_cfg, sizes, batch_size)
  except MeshError:
    return False
  return True


def suggest_growth(cfg: ModelConfig, mesh_cfg: MeshConfig, sizes: dict[str, int],
                   batch_size: int, seq_len: int, limit_bytes: int,
                   activation_bytes: int = 0, max_doublings: int = 6):
  """(axis, sizes, bytes) of the fewest doublings of one weight axis that fit `limit_bytes`.

  Each candidate keeps the model's shapes and the batch divisible; ties go to the axis listed
  first in GROWABLE (experts first: their weights are most of an MoE). None when nothing fits.
  """
  best = None
  for axis in GROWABLE:
    cand = dict(sizes)
    for n in range(1, max_doublings + 1):
      cand = _grown(cand, axis)
      if not _valid(cfg, mesh_cfg, cand, batch_size):
        break
      total = per_device_bytes(cfg, mesh_cfg, cand, batch_size, seq_len, activation_bytes)["total"]
      if total <= limit_bytes:
        if best is None or n < best[0]:
          best = (n, axis, cand, total)
        break
  return None if best is None else best[1:]


def format_mesh_plan(sizes: dict[str, int], rows: dict, limit_bytes: int | None,
                     growth) -> str:
  mesh = " x ".join(f"{a}={sizes[a]}" for a in MESH_AXES)
  lines = [f"per device on the mesh {mesh} ({math.prod(sizes.values())} devices):"]
  for name, value in rows.items():
    lines.append(f"  {name:12s} {value / _GIB:10.3f} GiB  ({value:,} bytes)")
  if limit_bytes is not None:
    if rows["total"] <= limit_bytes:
      lines.append(f"fits {limit_bytes / _GIB:.1f} GiB per device "
                   f"({limit_bytes - rows['total']:,} bytes to spare)")
    elif growth is None:
      lines.append(f"does not fit {limit_bytes / _GIB:.1f} GiB per device, and doubling one "
                   f"of {', '.join(GROWABLE)} does not make it fit; lower qat.batch_size or qat.seq_len, "
                   "or use more devices")
    else:
      axis, new, total = growth
      grown = " x ".join(f"{a}={new[a]}" for a in MESH_AXES)
      lines.append(f"does not fit {limit_bytes / _GIB:.1f} GiB per device: grow mesh.{axis} to "
                   f"{new[axis]} ({grown}, {math.prod(new.values())} devices: "
                   f"{total / _GIB:.3f} GiB per device)")
  return "\n".join(lines)
