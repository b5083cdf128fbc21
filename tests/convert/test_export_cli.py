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
  report = json.loads((tmp_path / "student.export_report.json").read_text())
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
  # Default flags: the README's 1e-5 holds without --dtype (bfloat16 was 1e-2 off).
  assert main(["export", "--workdir", str(qat_dir), "--format", "compressed-tensors", "--out",
               str(out)]) == 0
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


def _files(path) -> dict:
  """{relative path: bytes} of every file under a folder, or of one file."""
  if path.is_file():
    return {".": path.read_bytes()}
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_cli_export_from_the_packed_folder_equals_export_from_the_workdir(qat_dir, tmp_path,
                                                                          capsys):
  # Default flags everywhere: pack's float32, export's float32; every file byte for byte (the
  # GGUF's general.name included, and the HF weights' signed zeros).
  packed = tmp_path / "packed"
  assert main(["pack", "--workdir", str(qat_dir), "--out", str(packed)]) == 0
  outs = {"gguf": "m.gguf", "compressed-tensors": "ct", "hf": "hf"}
  for src, sub in (("--workdir", qat_dir), ("--packed", packed)):
    for fmt, out in outs.items():
      assert main(["export", src, str(sub), "--format", fmt, "--out",
                   str(tmp_path / src[2:] / out)]) == 0
  assert f"exported {packed} as GGUF" in capsys.readouterr().out
  for fmt, out in outs.items():
    a, b = _files(tmp_path / "workdir" / out), _files(tmp_path / "packed" / out)
    assert sorted(a) == sorted(b), fmt
    for name in a:
      assert a[name] == b[name], f"{fmt}: {name}"
  assert (_files(tmp_path / "workdir" / "m.export_report.json")
          == _files(tmp_path / "packed" / "m.export_report.json"))
  _, reader = read_gguf(tmp_path / "packed" / "m.gguf")
  assert bytes(reader.fields["general.name"].parts[-1]).decode() == qat_dir.name
  a = _safetensors(tmp_path / "packed" / "hf")
  assert any(np.any((v == 0) & ~np.signbit(v)) for v in a.values())  # zeros there, all +0.0
  assert not any(np.any((v == 0) & np.signbit(v)) for v in a.values())
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
  report = json.loads((tmp_path / "m.export_report.json").read_text())
  assert report["requantize_mixed"] == "Q4_0"
  assert not any("requantized" in r for r in report["tensors"])
  with pytest.raises(SystemExit) as stop:
    main(["export", "--workdir", str(qat_dir), "--format", "gguf", "--out", str(out),
          "--requantize-mixed", "Q2_K"])
  assert stop.value.code == 2 and "invalid choice: 'Q2_K'" in capsys.readouterr().err


# Every output, how it is asked for; "{out}" is the --out path.
OUTPUTS = {
    "pack": ["pack", "--workdir", "{qat}", "--out", "{out}"],
    "hf": ["export", "--workdir", "{qat}", "--format", "hf", "--out", "{out}"],
    "compressed-tensors": ["export", "--workdir", "{qat}", "--format", "compressed-tensors",
                           "--out", "{out}"],
    "gguf": ["export", "--workdir", "{qat}", "--format", "gguf", "--out", "{out}"],
}


HALF = {"pack": ("--fp-dtype", "bfloat16"), "hf": ("--dtype", "bfloat16"),
        "compressed-tensors": ("--dtype", "bfloat16"), "gguf": ("--fp-dtype", "f16")}


def _argv(fmt, qat_dir, out, *extra):
  return [a.format(qat=qat_dir, out=out) for a in OUTPUTS[fmt]] + list(extra)


def _snapshot(root) -> dict:
  """{relative path: bytes, or None for a folder} of everything under root (itself excluded)."""
  return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(root.rglob("*"))}


def _foreign_gguf(path):
  """A valid GGUF that moeqjax did not write (gguf's own writer, no moeqjax key)."""
  import gguf
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_name("someone else's")
  writer.add_tensor("t", np.zeros(32, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _not_ours(fmt, qat_dir, root):
  """(the --out path, why it is refused) for outputs moeqjax did not write, of this format."""
  cases = []
  user = root / "user_folder"
  (user / "sub").mkdir(parents=True)
  (user / "notes.txt").write_text("my notes")
  (user / "sub" / "data.bin").write_bytes(b"\x00\x01")
  plain = root / "plain_file"
  plain.write_text("not a model")
  if fmt == "gguf":
    cases += [(plain, "was not written by moeqjax"), (user, "is a folder")]
    _foreign_gguf(root / "theirs.gguf")
    cases.append((root / "theirs.gguf", "no moeqjax.writer key"))
    # Our GGUF's name, but a report beside it that is not ours.
    (root / "r.export_report.json").write_text('{"format": "gguf"}')
    cases.append((root / "r.gguf", "r.export_report.json was not written by moeqjax"))
  else:
    cases += [(user, "was not written by moeqjax"), (plain, "is a file")]
    # Another kind of moeqjax output: a pack folder is no hf / compressed-tensors export, and an
    # hf export no pack folder.
    other = "hf" if fmt == "pack" else "pack"
    assert main(_argv(other, qat_dir, root / "other")) == 0
    cases.append((root / "other", "was written by " + ("--format hf" if fmt == "pack"
                                                       else "`moeqjax pack`")))
    # Ours, but a user's file was added inside it: not replaced with it.
    assert main(_argv(fmt, qat_dir, root / "ours_plus")) == 0
    (root / "ours_plus" / "mine.txt").write_text("keep")
    cases.append((root / "ours_plus", "holds files moeqjax did not write (mine.txt)"))
  return cases


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
def test_overwrite_never_touches_what_moeqjax_did_not_write(fmt, qat_dir, tmp_path, capsys):
  root = tmp_path / "root"
  root.mkdir()
  cases = _not_ours(fmt, qat_dir, root)
  capsys.readouterr()
  before = _snapshot(root)
  for out, why in cases:
    for extra in ((), ("--overwrite",)):
      code, err = _err(capsys, *_argv(fmt, qat_dir, out, *extra))
      assert code == 2 and err.count("\n") == 1 and err.startswith("moeqjax: error:"), err
      assert (why if extra else "exists; pass --overwrite") in err, err
  assert _snapshot(root) == before  # contents equal, nothing deleted, no temporary left


@pytest.mark.parametrize("fmt", sorted(OUTPUTS))
def test_overwrite_replaces_moeqjax_own_output(fmt, qat_dir, tmp_path, capsys):
  out = tmp_path / ("m.gguf" if fmt == "gguf" else "out")
  if fmt != "gguf":
    out.mkdir()  # an empty folder is written without --overwrite
  assert main(_argv(fmt, qat_dir, out)) == 0
  first = _snapshot(tmp_path)
  code, err = _err(capsys, *_argv(fmt, qat_dir, out))
  assert code == 2 and f"{out} exists; pass --overwrite to replace it" in err
  assert err.count("\n") == 1
  # Replaced by a different output (half-width unquantized weights), nothing left beside it.
  assert main(_argv(fmt, qat_dir, out, "--overwrite", *HALF[fmt])) == 0
  second = _snapshot(tmp_path)
  assert sorted(second) == sorted(first) and second != first


def test_two_gguf_exports_in_one_folder_keep_two_reports(qat_dir, tmp_path):
  for name, fp in (("a", "f32"), ("b", "f16")):
    assert main(["export", "--workdir", str(qat_dir), "--format", "gguf", "--out",
                 str(tmp_path / f"{name}.gguf"), "--fp-dtype", fp]) == 0
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "a.export_report.json", "a.gguf", "b.export_report.json", "b.gguf"]
  for name, fp in (("a", "f32"), ("b", "f16")):
    report = json.loads((tmp_path / f"{name}.export_report.json").read_text())
    assert report["file"] == f"{name}.gguf" and report["fp_dtype"] == fp
    assert report["file_bytes"] == (tmp_path / f"{name}.gguf").stat().st_size
