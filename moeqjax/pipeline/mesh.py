"""The device mesh of a run: its `mesh` section checked against the devices, model and batch."""

from __future__ import annotations

import jax

from moeqjax.pipeline import config as config_io
from moeqjax.train.sharding import EvalPlacement, Placement, eval_placement, placement


def check_mesh_devices(config) -> dict[str, int]:
  """The `mesh` section's sizes on this process's devices (a MeshError if they do not fit)."""
  return config_io.mesh_config(config).sizes(jax.device_count())


def _several_devices(config, devices):
  """(mesh section, devices) when the run spans several devices, else None; the mesh sizes are
  checked against the device count first, so a mesh that needs more devices than there are is
  an error even on one device."""
  devices = jax.devices() if devices is None else list(devices)
  mesh_cfg = config_io.mesh_config(config)
  mesh_cfg.sizes(len(devices))
  return None if len(devices) == 1 else (mesh_cfg, devices)


def _model_config(config):
  """The config's ModelConfig, or SwitchConfig for a Switch config."""
  if config_io.is_switch(config):
    return config_io.switch_config(config)
  return config_io.model_config(config)


def run_placement(config, abstract_state, batch_size: int, devices=None) -> Placement | None:
  """The placement of a pretrain/QAT run (either model family), or None on one device (today's
  unsharded path)."""
  several = _several_devices(config, devices)
  if several is None:
    return None
  mesh_cfg, devices = several
  return placement(mesh_cfg, _model_config(config), abstract_state, batch_size, devices)


def sharded_template(config, abstract_state):
  """`abstract_state` with each leaf's sharding on this run's mesh, so that orbax restores every
  array straight into its shards; unchanged on one device."""
  if jax.device_count() == 1:
    return abstract_state
  mesh_cfg = config_io.mesh_config(config)
  # The batch does not matter for a restore: 0 rows split over any mesh.
  place = placement(mesh_cfg, _model_config(config), abstract_state, 0)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_state, place.state)


def eval_mesh(config, devices=None) -> EvalPlacement | None:
  """Where `moeqjax eval` and the demo's evaluation run: the config's mesh over the devices of all
  processes, or None on one device (today's unsharded path)."""
  several = _several_devices(config, devices)
  if several is None:
    return None
  mesh_cfg, devices = several
  return eval_placement(mesh_cfg, config_io.model_config(config), devices)
