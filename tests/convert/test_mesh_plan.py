"""`moeqjax plan` per device on a mesh: Mixtral-8x7B on a TPU v5p-64 slice, from shard shapes alone."""

import pytest

from moeqjax import cli
from moeqjax.convert.mesh_plan import per_device_bytes
from moeqjax.convert.plan import plan
from moeqjax.pipeline import config as config_io

MIXTRAL = "configs/mixtral_8x7b.py"
_GIB = 2**30


def _mixtral(**overrides):
  config = config_io.load_config(MIXTRAL)
  config_io.apply_overrides(config, overrides)
  return config, config_io.model_config(config), config_io.mesh_config(config)


def test_mixtral_on_v5p_64_fits_and_matches_the_arithmetic(capsys):
  # v5p-64 is 32 chips: the config's mesh is fsdp=4 x expert=8 (data=-1 -> 1).
  assert cli.main(["plan", "--config", MIXTRAL, "--device-memory-gib", "95"]) == 0
  out = capsys.readouterr().out
  assert "per device on the mesh data=1 x fsdp=4 x expert=8 x tensor=1 (32 devices)" in out
  assert "fits 95.0 GiB per device" in out
  config, cfg, mesh_cfg = _mixtral()
  counts = plan(cfg, 32, 2048)["params"]
  # Oracle from the parameter counts: expert and router matrices are split over expert=8 and
  # fsdp=4 (their D axis), every other weight over fsdp=4 alone; bf16 is 2 bytes.
  expected = 2 * ((counts["experts"] + counts["router"]) // 32
                  + (counts["embed"] + counts["attn"] + counts["norm"] + counts["shared"]) // 4)
  for devices, batch in ((32, 32), (64, 64)):  # 64 devices: data=2 replicates the weights
    sizes = mesh_cfg.sizes(devices)
    rows = per_device_bytes(cfg, mesh_cfg, sizes, batch, 2048)
    assert rows["params"] == rows["teacher"] == rows["gradients"] == expected
    assert rows["optimizer"] == 2 * expected
    assert rows["codes"] == cfg.num_layers * cfg.num_experts * 4  # int32 expert codes only
  assert f"params            3.372 GiB  ({expected:,} bytes)" in out


def test_plan_says_which_axis_to_grow(capsys):
  args = ["plan", "--config", MIXTRAL, "--devices", "32", "--device-memory-gib", "70",
          "--config.mesh.fsdp=1", "--config.mesh.expert=2"]
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "does not fit 70.0 GiB per device: grow mesh.fsdp to 16 (data=1 x fsdp=16 x expert=2" \
      in out
  config, cfg, mesh_cfg = _mixtral(**{"mesh.fsdp": "1", "mesh.expert": "2"})
  act = plan(cfg, 32, 2048)["qat_activation_bytes"]

  def total(data, fsdp, expert):
    sizes = dict(data=data, fsdp=fsdp, expert=expert, tensor=1)
    return per_device_bytes(cfg, mesh_cfg, sizes, 32, 2048, act)["total"]

  # The suggestion fits, one doubling fewer does not, and growing experts to all 8 does not.
  assert total(1, 16, 2) <= 70 * _GIB < total(2, 8, 2)
  assert total(4, 1, 8) > 70 * _GIB


@pytest.mark.parametrize("args, message", [
    (["--config.mesh.expert=3", "--devices", "32"], "product 12 does not divide the 32 devices"),
    (["--devices", "64"], "qat.batch_size=32 is not divisible by the 64 batch shards"),
    (["--config.mesh.expert=16", "--devices", "64", "--config.qat.batch_size=64"],
     "model.num_experts = 8 is not divisible by expert = 16"),
    (["--devices", "0"], "--devices 0 must be >= 1"),
])
def test_plan_mesh_errors(capsys, args, message):
  assert cli.main(["plan", "--config", MIXTRAL] + args) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1, err
