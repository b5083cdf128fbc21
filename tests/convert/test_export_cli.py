"""`moeqjax export` over a real (tiny) QAT workdir and its packed folder: GGUF, compressed-tensors, HF, and one-line errors."""

import json
import shutil

import numpy as np
import pytest

from moeqjax.cli import main
from moeqjax.convert.safetensors_io import read_header, read_tensor

from gguf_models import read_gguf

pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")


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


def _safetensors(folder):
  header = read_header(folder / "model.safetensors")
  return {name: read_tensor(info) for name, info in header.items()}


def test_cli_export_compressed_tensors_from_a_qat_workdir(qat_dir, tmp_path, capsys):
  pytest.importorskip("torch", reason="needs torch (pip install -e .[parity])")
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra (compressed-tensors)")
  import jax
  import jax.numpy as jnp
  from ct_models import load_ct, logits, tokens
  from moeqjax.model import MoETransformer
  from moeqjax.pipeline.export import load_student
  out = tmp_path / "ct"
  assert main(["export", "--workdir", str(qat_dir), "--format", "compressed-tensors", "--out",
               str(out), "--dtype", "float32"]) == 0
  assert "as compressed-tensors (int4 experts)" in capsys.readouterr().out
  report = json.loads((out / "export_report.json").read_text())
  assert report["expert_container"] == "int4" and report["file_bytes"] == (
      out / "model.safetensors").stat().st_size
  # The runtime oracle: transformers + compressed-tensors computes our student's logits.
  cfg, params, quant = load_student(qat_dir)
  toks = tokens(batch=1, seq=10)
  ours = np.asarray(jax.jit(MoETransformer(cfg).apply)({"params": params, "quant": quant},
                                                      jnp.asarray(toks)))
  np.testing.assert_allclose(logits(load_ct(out), toks), ours, atol=1e-5, rtol=0)
  capsys.readouterr()  # transformers' loading bars
  code, err = _err(capsys, "export", "--workdir", str(qat_dir), "--format", "compressed-tensors",
                   "--out", str(out))
  assert code == 2 and "exists; pass --overwrite" in err and err.count("\n") == 1


def test_cli_export_from_the_packed_folder_equals_export_from_the_workdir(qat_dir, tmp_path,
                                                                          capsys):
  packed = tmp_path / "packed"
  assert main(["pack", "--workdir", str(qat_dir), "--out", str(packed), "--fp-dtype",
               "float32"]) == 0
  for src, sub in (("--workdir", qat_dir), ("--packed", packed)):
    assert main(["export", src, str(sub), "--format", "gguf", "--out",
                 str(tmp_path / src[2:] / "m.gguf")]) == 0
    assert main(["export", src, str(sub), "--format", "compressed-tensors", "--out",
                 str(tmp_path / src[2:] / "ct")]) == 0
  assert f"exported {packed} as GGUF" in capsys.readouterr().out
  (a, _), (b, _) = (read_gguf(tmp_path / sub / "m.gguf") for sub in ("workdir", "packed"))
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name][0] == b[name][0], name
    np.testing.assert_array_equal(a[name][1], b[name][1], err_msg=name)
  a, b = _safetensors(tmp_path / "workdir" / "ct"), _safetensors(tmp_path / "packed" / "ct")
  assert sorted(a) == sorted(b)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  # A damaged or unfinished packed folder is refused in one line, and nothing is written.
  broken, unfinished = tmp_path / "broken", tmp_path / "unfinished"
  for folder in (broken, unfinished):
    shutil.copytree(packed, folder)
  data = bytearray((broken / "model.safetensors").read_bytes())
  data[-1] ^= 0xFF
  (broken / "model.safetensors").write_bytes(bytes(data))
  (unfinished / "manifest.json").unlink()  # pack writes the manifest last
  for src, match in ((broken, "fails its sha256 check"), (unfinished, "no manifest.json")):
    for fmt, out in (("gguf", tmp_path / "x.gguf"), ("compressed-tensors", tmp_path / "x_ct")):
      code, err = _err(capsys, "export", "--packed", str(src), "--format", fmt, "--out", str(out))
      assert code == 2 and match in err and err.count("\n") == 1, err
  assert not any(tmp_path.glob("x*"))
  with pytest.raises(SystemExit) as stop:  # argparse refuses both sources, in one line
    main(["export", "--workdir", str(qat_dir), "--packed", str(packed), "--format", "gguf",
          "--out", str(tmp_path / "x.gguf")])
  err = capsys.readouterr().err
  assert stop.value.code == 2 and "not allowed with argument" in err


def test_cli_requantize_mixed_is_passed_through(qat_dir, tmp_path, capsys):
  # The QAT run's experts are all ternary: nothing is mixed, so nothing is re-quantized, and the
  # report records the request; a bad type is argparse's one-line error.
  out = tmp_path / "m.gguf"
  assert main(["export", "--workdir", str(qat_dir), "--format", "gguf", "--out", str(out),
               "--requantize-mixed", "Q4_0"]) == 0
  report = json.loads((tmp_path / "export_report.json").read_text())
  assert report["requantize_mixed"] == "Q4_0"
  assert not any("requantized" in r for r in report["tensors"])
  with pytest.raises(SystemExit) as stop:
    main(["export", "--workdir", str(qat_dir), "--format", "gguf", "--out", str(out),
          "--requantize-mixed", "Q2_K"])
  assert stop.value.code == 2 and "invalid choice: 'Q2_K'" in capsys.readouterr().err
