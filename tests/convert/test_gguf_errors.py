"""GGUF export refuses what llama.cpp cannot hold, in one line."""

import pytest

from moeqjax.convert import ConvertError
from moeqjax.convert.gguf_export import export_gguf
from moeqjax.model import QuantRules

from gguf_models import gguf_cfg, read_gguf, student

pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")


@pytest.mark.parametrize("changes,field", [
    (dict(qk_norm="full", num_kv_heads=2, norm_topk_prob=False), "model.num_kv_heads=2"),
    (dict(qk_norm="head", shared_d_ff=64, shared_expert_gate=True), "model.shared_d_ff=64"),
    (dict(norm_topk_prob=False), "model.norm_topk_prob=False"),  # llama arch renormalises
    (dict(qk_norm="full", num_kv_heads=4), "model.norm_topk_prob=True"),  # olmoe does not
    (dict(shared_d_ff=64, shared_expert_gate=True), "model.norm_topk_prob=True"),  # qwen2moe
    (dict(shared_d_ff=64, norm_topk_prob=False), "model.shared_expert_gate=False"),
    (dict(qk_norm="full", num_kv_heads=4, norm_topk_prob=False, clip_qkv=1.0),
     "model.clip_qkv=1.0"),
    (dict(qk_norm="head", attn_bias=True, attn_out_bias=True), "model.attn_out_bias=True"),
    (dict(qk_norm="full", num_kv_heads=4, norm_topk_prob=False, head_dim=32),
     "model.head_dim=32"),
    (dict(quant=QuantRules(expert_code=1, act_bits=8)), "model.quant.act_bits=8"),
])
def test_no_arch_fits_names_the_field(tmp_path, changes, field):
  cfg = gguf_cfg(d=64, f=64, num_layers=1, **changes)
  with pytest.raises(ConvertError) as err:  # refused from the config alone, before any weight
    export_gguf(cfg, None, None, tmp_path / "m.gguf")
  assert field in str(err.value) and "\n" not in str(err.value)
  assert not list(tmp_path.iterdir())  # nothing written


def test_row_length_falls_back_to_the_next_exact_type_and_says_so(tmp_path):
  cfg = gguf_cfg(d=64, f=64, num_layers=1)  # ternary rows of 64: no TQ2_0/TQ1_0 (blocks of 256)
  params, quant = student(cfg)
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  row = {r["name"]: r for r in report["tensors"]}["blk.0.ffn_down_exps.weight"]
  assert row["ggml_type"] == "Q4_0"
  assert "TQ2_0 not exact: row length 64 is not a multiple of its block of 256" in row["note"]
  got, _ = read_gguf(tmp_path / "m.gguf")
  assert got["blk.0.ffn_down_exps.weight"][0] == "Q4_0"


def test_row_length_no_block_type_holds_is_refused(tmp_path):
  cfg = gguf_cfg(d=48, f=48, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=24)
  params, quant = student(cfg)
  with pytest.raises(ConvertError) as err:
    export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  msg = str(err.value)
  assert "blk.0.ffn_gate_exps.weight" in msg and "row length 48" in msg and "\n" not in msg
  assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()


def test_scale_not_exact_in_fp16_is_refused_with_the_fix(tmp_path):
  cfg = gguf_cfg(d=64, f=64, num_layers=1, quant=QuantRules(expert_code=4, scale_bytes=4))
  params, quant = student(cfg)
  with pytest.raises(ConvertError) as err:
    export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  assert "quant.scale_bytes=2" in str(err.value) and "blk.0.ffn_gate_exps.weight" in str(err.value)


def test_existing_output_needs_overwrite_and_must_be_ours(tmp_path):
  cfg = gguf_cfg(d=64, f=64, num_layers=1)
  params, quant = student(cfg)
  out = tmp_path / "m.gguf"
  out.write_bytes(b"keep me")
  with pytest.raises(ConvertError, match="exists; pass --overwrite"):
    export_gguf(cfg, params, quant, out)
  with pytest.raises(ConvertError, match="was not written by moeqjax"):
    export_gguf(cfg, params, quant, out, overwrite=True)
  assert out.read_bytes() == b"keep me"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
  out.unlink()
  export_gguf(cfg, params, quant, out)
  first = out.read_bytes()
  assert first[:4] == b"GGUF"
  export_gguf(cfg, params, quant, out, overwrite=True)  # ours: replaced
  assert out.read_bytes() == first
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m.export_report.json", "m.gguf"]
