"""`moeqjax pack` then `moeqjax generate` from the CLI, and the one-line errors of bad input."""

import json
import re
import shutil

import pytest

from moeqjax.cli import main
from test_pipeline_small import finished_runs  # noqa: F401  (the module-scoped runs fixture)

PROMPT = "line 7: the quick"


def _gen(capsys, *source, extra=()):
  code = main(["generate", *source, "--prompt", PROMPT, "--max-new-tokens", "12", *extra])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_pack_then_generate_matches_the_fake_quant_student(finished_runs, capsys):
  tmp_path, _ = finished_runs
  packed = tmp_path / "packed"
  # Default flags: pack's float32 keeps generate --packed equal to generate --workdir.
  assert main(["pack", "--workdir", str(tmp_path / "q"), "--out", str(packed)]) == 0
  said = capsys.readouterr().out
  manifest = json.loads((packed / "manifest.json").read_text())
  expert_bytes = 2 * 4 * (192 + 192 + 160)  # as in test_pretrain_qat_eval
  assert manifest["bytes"]["expert_tensors_on_disk"] == expert_bytes
  assert manifest["fp_dtype"] == "float32"
  assert f"expert tensors {expert_bytes:,} bytes on disk (memory accounting: {expert_bytes:,}" in said
  code, from_packed, err = _gen(capsys, "--packed", str(packed))
  assert code == 0 and from_packed.startswith(PROMPT) and len(from_packed) > len(PROMPT) + 1
  assert "[packed]" in err and "decode" in err and "tok/s" in err
  code, from_student, err = _gen(capsys, "--workdir", str(tmp_path / "q"))
  assert code == 0 and "[fake-quant student]" in err
  assert from_packed == from_student  # greedy: identical text from packed and fake-quant weights
  # The tiny model's text survives bf16 too; its logits do not (about 1e-3 off): the default keeps
  # what `generate` computes from the two sources equal.
  import jax.numpy as jnp
  import numpy as np
  from moeqjax.pipeline.serve import model_for_generation
  toks = jnp.asarray([list(PROMPT.encode())])
  (m_p, v_p, *_), (m_w, v_w, *_) = (model_for_generation(str(packed), None),
                                    model_for_generation(None, str(tmp_path / "q")))
  np.testing.assert_allclose(np.asarray(m_p.apply(v_p, toks)), np.asarray(m_w.apply(v_w, toks)),
                             atol=1e-5, rtol=0)
  code, from_teacher, err = _gen(capsys, "--workdir", str(tmp_path / "fp"))
  assert code == 0 and "[full precision]" in err and from_teacher.startswith(PROMPT)
  # Sampling runs and is reproducible for a seed.
  sampled = [_gen(capsys, "--packed", str(packed),
                  extra=("--temperature", "1.0", "--top-k", "5", "--seed", "3"))[1]
             for _ in range(2)]
  assert sampled[0] == sampled[1]


def _damaged(tmp_path, name, edit):
  src = tmp_path / "packed_default"
  if not src.exists():
    assert main(["pack", "--workdir", str(tmp_path / "q"), "--out", str(src)]) == 0
  dst = tmp_path / name
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  edit(dst)
  return dst


def _edit_manifest(change):
  def edit(folder):
    m = json.loads((folder / "manifest.json").read_text())
    change(m)
    (folder / "manifest.json").write_text(json.dumps(m))
  return edit


def _flip_last_byte(folder):
  data = bytearray((folder / "model.safetensors").read_bytes())
  data[-1] ^= 0xFF
  (folder / "model.safetensors").write_bytes(bytes(data))


def _truncate(folder):
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:len(data) - 100])


def _drop_tensor(m):
  name = next(n for n in m["tensors"] if n.endswith("w_out.ternary.scales"))
  del m["tensors"][name]


def _wrong_config(m):
  m["model_config"]["d_ff"] = 48


@pytest.mark.parametrize("name,edit,match", [
    ("corrupt", _flip_last_byte, "fails its sha256 check"),
    ("truncated", _truncate, "model.safetensors.*truncated"),
    ("version", _edit_manifest(lambda m: m.update(format_version=99)), "format_version 99"),
    ("missing", _edit_manifest(_drop_tensor), r"no scales tensor for layers_\d/moe/w_out at code 1"),
    ("config", _edit_manifest(_wrong_config), "the manifest and the tensors disagree"),
    ("nofile", lambda f: (f / "model.safetensors").unlink(), "model.safetensors is missing"),
])
def test_damaged_packed_checkpoints_are_refused(finished_runs, capsys, name, edit, match):
  tmp_path, _ = finished_runs
  folder = _damaged(tmp_path, name, edit)
  capsys.readouterr()  # what pack printed
  code, out, err = _gen(capsys, "--packed", str(folder))
  assert code == 2 and out == ""
  assert len(err.strip().splitlines()) == 1
  assert err.startswith("moeqjax: error:")
  assert re.search(match, err), err


def test_bad_generate_and_pack_requests(finished_runs, capsys):
  tmp_path, _ = finished_runs
  q = str(tmp_path / "q")
  for extra, match in ((("--temperature", "-1"), "--temperature -1.0 must be >= 0"),
                       (("--max-new-tokens", "0"), "--max-new-tokens 0 must be at least 1")):
    code, _, err = _gen(capsys, "--workdir", q, extra=extra)
    assert code == 2 and match in err, err
  long_prompt = "x" * 200  # the tiny config's context is 128 bytes
  assert main(["generate", "--workdir", q, "--prompt", long_prompt]) == 2
  assert "does not fit the model's context of 128" in capsys.readouterr().err
  # pack: an unfinished QAT run, a pretrain workdir, an existing output
  shutil.copytree(tmp_path / "q", tmp_path / "q_unfinished")
  (tmp_path / "q_unfinished" / "config.json").write_text(
      (tmp_path / "q" / "config.json").read_text().replace('"steps": 4', '"steps": 40'))
  assert main(["pack", "--workdir", str(tmp_path / "q_unfinished"), "--out",
               str(tmp_path / "never")]) == 2
  assert "no finished QAT run of 40 steps" in capsys.readouterr().err
  assert not (tmp_path / "never").exists()
  assert main(["pack", "--workdir", str(tmp_path / "fp"), "--out", str(tmp_path / "never")]) == 2
  assert "is not a `moeqjax qat` run" in capsys.readouterr().err
  (tmp_path / "exists").mkdir()
  (tmp_path / "exists" / "notes.txt").write_text("mine")
  assert main(["pack", "--workdir", q, "--out", str(tmp_path / "exists")]) == 2
  assert "exists; pass --overwrite to replace it" in capsys.readouterr().err
