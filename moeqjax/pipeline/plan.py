"""`moeqjax plan`: parameter counts, weight bytes and QAT memory of a config (and per device on its mesh), with nothing allocated."""

from moeqjax.convert.mesh_plan import (check_mesh, format_mesh_plan, per_device_bytes,
                                       suggest_growth)
from moeqjax.convert.plan import format_plan, plan
from moeqjax.pipeline import config as config_io

_GIB = 2**30


def plan_text(config, devices: int | None = None, device_memory_gib: float | None = None) -> str:
  """The memory plan of `config`'s model and QAT batch, as printed by `moeqjax plan`.

  Args:
    config: the experiment config; its `mesh` section gives the mesh.
    devices: the device count that resolves a -1 mesh axis; None = the product of the fixed
      sizes (a -1 axis of size 1), so no devices are needed.
    device_memory_gib: per-device memory; when given, says whether the plan fits and, if not,
      which mesh axis to grow.
  """
  cfg = config_io.model_config(config)
  batch, seq = config.qat.batch_size, config.qat.seq_len
  p = plan(cfg, batch, seq)
  mesh_cfg = config_io.mesh_config(config)
  sizes = mesh_cfg.sizes(mesh_cfg.fixed_devices() if devices is None else devices)
  check_mesh(cfg, mesh_cfg, sizes, batch, "qat.batch_size")
  act = p["qat_activation_bytes"]
  rows = per_device_bytes(cfg, mesh_cfg, sizes, batch, seq, act)
  limit = None if device_memory_gib is None else int(device_memory_gib * _GIB)
  growth = None
  if limit is not None and rows["total"] > limit:
    growth = suggest_growth(cfg, mesh_cfg, sizes, batch, seq, limit, act)
  return format_plan(cfg, p) + "\n" + format_mesh_plan(sizes, rows, limit, growth)
