"""compressed-tensors export refuses what the runtimes cannot hold exactly, in one line, writing nothing."""

import pytest

from moeqjax.convert import ConvertError
from moeqjax.convert.ct_export import export_compressed_tensors

from ct_models import ct_student


def check_refused(tmp_path, cfg, params, quant, *fragments):
  with pytest.raises(ConvertError) as err:
    export_compressed_tensors(cfg, params, quant, tmp_path / "ct")
  msg = str(err.value)
  assert all(f in msg for f in fragments) and "\n" not in msg, msg
  assert not list(tmp_path.iterdir())  # nothing written, no .partial left
  return msg


def test_scale_not_exact_in_fp16_names_the_tensor_and_the_fix(tmp_path):
  cfg, params, quant = ct_student("mixtral", [[4, 4, 4, 4], [4, 4, 4, 4]], scale_bytes=4)
  check_refused(tmp_path, cfg, params, quant, "model.layers.0.block_sparse_moe.experts.",
           "quant.scale_bytes=2")


@pytest.mark.parametrize("group_size", [16, 8])
def test_group_size_vllm_cannot_run_is_refused(tmp_path, group_size):
  cfg, params, quant = ct_student("qwen3_moe", [[1, 1, 1, 1]] * 2, granularity="group",
                                  group_size=group_size)
  check_refused(tmp_path, cfg, params, quant, f"quant.group_size={group_size}", "32, 64, 128")


def test_asymmetric_int8_experts_are_refused(tmp_path):
  cfg, params, quant = ct_student("mixtral", [[8, 4, 4, 4]] * 2, symmetric=False)
  check_refused(tmp_path, cfg, params, quant, "asymmetric int8", "quant.symmetric=True")


def test_layout_no_family_fits_names_the_field(tmp_path):
  cfg, params, quant = ct_student("qwen3_moe", [[1, 1, 1, 1]] * 2)
  cfg = cfg.replace(shared_d_ff=64, shared_expert_gate=True)
  check_refused(tmp_path, cfg, params, quant, "model.shared_d_ff=64")


def test_existing_output_needs_overwrite_and_must_be_ours(tmp_path):
  cfg, params, quant = ct_student("mixtral", [[1, 1, 1, 1]] * 2)
  out = tmp_path / "ct"
  out.mkdir()
  (out / "keep").write_text("me")
  with pytest.raises(ConvertError, match="exists; pass --overwrite"):
    export_compressed_tensors(cfg, params, quant, out)
  with pytest.raises(ConvertError, match="was not written by moeqjax"):
    export_compressed_tensors(cfg, params, quant, out, overwrite=True)
  assert [p.name for p in out.iterdir()] == ["keep"] and (out / "keep").read_text() == "me"
  (out / "keep").unlink()  # an empty folder is written without --overwrite
  export_compressed_tensors(cfg, params, quant, out)
  report = export_compressed_tensors(cfg, params, quant, out, overwrite=True)
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "export_report.json",
                                                   "model.safetensors", "moeqjax_export.json"]
  assert report["file_bytes"] == (out / "model.safetensors").stat().st_size
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]
