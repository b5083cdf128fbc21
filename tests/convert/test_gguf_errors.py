"""GGUF export refuses what llama.cpp cannot hold, and the CLI turns that into one-line errors."""

import json
import shutil

import pytest

from moeqjax.cli import main
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


def test_existing_output_needs_overwrite(tmp_path):
  cfg = gguf_cfg(d=64, f=64, num_layers=1)
  params, quant = student(cfg)
  out = tmp_path / "m.gguf"
  out.write_bytes(b"keep me")
  with pytest.raises(ConvertError, match="exists; pass --overwrite"):
    export_gguf(cfg, params, quant, out)
  assert out.read_bytes() == b"keep me"
  export_gguf(cfg, params, quant, out, overwrite=True)
  assert out.read_bytes()[:4] == b"GGUF"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["export_report.json", "m.gguf"]


# The CLI over a real (tiny) QAT workdir. Rows of 32 admit Q4_0 only, so ternary falls back.
TINY = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.head_dim=16", "--config.model.d_ff=32", "--config.model.num_experts=4",
        "--config.pretrain.steps=2", "--config.pretrain.warmup_steps=1",
        "--config.pretrain.batch_size=2", "--config.pretrain.seq_len=16",
        "--config.qat.steps=2", "--config.qat.warmup_steps=1", "--config.qat.batch_size=2",
        "--config.qat.seq_len=16"]


@pytest.fixture(scope="module")
def qat_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("gguf_cli")
  data = root / "corpus.txt"
  data.write_text("".join(f"line {i}: the quick brown fox\n" for i in range(200)))
  args = ["--data", str(data), *TINY]
  assert main(["pretrain", "--workdir", str(root / "fp"), *args]) == 0
  assert main(["qat", "--workdir", str(root / "q"), "--teacher", str(root / "fp"), *args]) == 0
  return root / "q"


def _err(capsys, *argv):
  code = main(list(argv))
  err = capsys.readouterr().err
  return code, err


def test_cli_export_gguf_from_a_qat_workdir(qat_dir, tmp_path, capsys):
  out = tmp_path / "student.gguf"
  assert main(["export", "--workdir", str(qat_dir), "--format", "gguf", "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "llama.cpp arch llama" in printed and "note: blk.0.ffn_gate_exps.weight" in printed
  report = json.loads((tmp_path / "export_report.json").read_text())
  assert report["file"] == "student.gguf" and report["file_bytes"] == out.stat().st_size
  got, reader = read_gguf(out)
  assert got["blk.1.ffn_up_exps.weight"][0] == "Q4_0"
  assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
  code, err = _err(capsys, "export", "--workdir", str(qat_dir), "--format", "gguf", "--out",
                   str(out))
  assert code == 2 and "exists; pass --overwrite" in err and err.count("\n") == 1
  assert main(["export", "--workdir", str(qat_dir), "--format", "gguf", "--out", str(out),
               "--overwrite", "--fp-dtype", "bf16"]) == 0
  assert read_gguf(out)[0]["token_embd.weight"][0] == "BF16"
  assert main(["export", "--workdir", str(qat_dir), "--format", "hf", "--out",
               str(tmp_path / "hf"), "--dtype", "float32"]) == 0  # the hf format still works
  assert (tmp_path / "hf" / "config.json").is_file()


def test_cli_export_refuses_unfinished_and_corrupted_runs(qat_dir, tmp_path, capsys):
  unfinished = tmp_path / "unfinished"
  shutil.copytree(qat_dir, unfinished)
  record = json.loads((unfinished / "config.json").read_text())
  record["qat"]["steps"] = 50
  (unfinished / "config.json").write_text(json.dumps(record))
  code, err = _err(capsys, "export", "--workdir", str(unfinished), "--format", "gguf", "--out",
                   str(tmp_path / "a.gguf"))
  assert code == 2 and "is unfinished (step 2 of 50)" in err and err.count("\n") == 1
  corrupted = tmp_path / "corrupted"
  shutil.copytree(qat_dir, corrupted)
  for f in (corrupted / "ckpt").rglob("*"):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(b"\0" * 7)
  code, err = _err(capsys, "export", "--workdir", str(corrupted), "--format", "gguf", "--out",
                   str(tmp_path / "b.gguf"))
  assert code == 2 and "cannot be read" in err and err.count("\n") == 1
  code, err = _err(capsys, "export", "--workdir", str(tmp_path), "--format", "gguf", "--out",
                   str(tmp_path / "c.gguf"))
  assert code == 2 and "is not a finished `moeqjax qat` run" in err
  assert not any(tmp_path.glob("*.gguf*"))
