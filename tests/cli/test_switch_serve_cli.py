"""`moeqjax pack`, `generate` and `export` on a Switch Transformer run from the CLI, checked against
the fake-quant student restored from the QAT workdir by the library alone (the oracle)."""

import json

import jax
import numpy as np
import pytest

from moeqjax.cli import main
from moeqjax.model import SwitchTransformer
from moeqjax.serve import SamplingConfig, switch_generate, switch_greedy

from switch_micro import micro_config, restore

PRE_STEPS, QAT_STEPS = 30, 10  # the warmups; cheap: the checks are equalities, not quality
NEW = 24
VOCAB, BYTES = 320, 256  # switch_tiny: UTF-8 bytes, then 64 sentinels (319 = <extra_id_0>)
PROMPT = "def main(<extra_id_0>):\n    return <extra_id_1>\n"


def _run(*args):
  assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  w = tmp_path_factory.mktemp("switch_serve")
  (w / "switch_micro.py").write_text(micro_config(PRE_STEPS, QAT_STEPS))
  _run("pretrain", "--config", w / "switch_micro.py", "--workdir", w / "pre")
  _run("qat", "--teacher", w / "pre", "--workdir", w / "qat")
  _run("pack", "--workdir", w / "qat", "--out", w / "packed")
  return w


@pytest.fixture(scope="module")
def student(runs):
  """(model, fake-quant variables, teacher variables), restored from the workdirs."""
  cfg, params, quant = restore(runs / "switch_micro.py", runs / "qat", QAT_STEPS, "qat")
  _, teacher, _ = restore(runs / "switch_micro.py", runs / "pre", PRE_STEPS, "pretrain")
  return SwitchTransformer(cfg), {"params": params, "quant": quant}, {"params": teacher}


def _prompt_ids():
  """PROMPT's encoder ids, made here: its bytes, the sentinels as ids 319 and 318."""
  a, rest = PROMPT.split("<extra_id_0>")
  b, c = rest.split("<extra_id_1>")
  return [*a.encode(), VOCAB - 1, *b.encode(), VOCAB - 2, *c.encode()]


def _text(tokens) -> str:
  """Generated ids as text, made here: byte runs as UTF-8, ids above the bytes as <extra_id_N>."""
  out, run = [], b""
  for t in tokens:
    if t < BYTES:
      run += bytes([t])
    else:
      out += [run.decode("utf-8", "replace"), f"<extra_id_{VOCAB - 1 - t}>"]
      run = b""
  return "".join(out) + run.decode("utf-8", "replace")


def _logits(model, variables, enc, dec):
  return np.asarray(jax.jit(model.apply)(variables, enc, dec)[0])


def _torch_logits(model, enc, dec):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(enc, dtype=torch.long),
                 decoder_input_ids=torch.as_tensor(dec, dtype=torch.long)).logits.numpy()


def test_generate_from_pack_and_workdir_equals_switch_greedy(runs, student, capsys):
  model, fake_quant, _ = student
  manifest = json.loads((runs / "packed" / "manifest.json").read_text())
  assert manifest["model_family"] == "switch" and manifest["fp_dtype"] == "float32"
  assert manifest["eos_id"] is None  # span-corruption targets on bytes never end early
  want = [int(t) for t in switch_greedy(model, fake_quant, [_prompt_ids()], NEW)[0]]
  for source, label in (("--packed", "[packed, Switch greedy]"),
                        ("--workdir", "[fake-quant student, Switch greedy]")):
    path = runs / ("packed" if source == "--packed" else "qat")
    capsys.readouterr()
    assert main(["generate", source, str(path), "--prompt", PROMPT,
                 "--max-new-tokens", str(NEW)]) == 0
    out = capsys.readouterr()
    assert out.out == _text(want) + "\n", source
    assert label in out.err and f"{NEW} tokens from {len(_prompt_ids())} encoder tokens" in out.err
  # Sampled: the library's switch_generate with the flags' rule and seed.
  rule = SamplingConfig(temperature=0.7, top_k=5)
  want = [int(t) for t in switch_generate(model, fake_quant, [_prompt_ids()], NEW, sampling=rule,
                                          seed=3)[0]]
  capsys.readouterr()
  assert main(["generate", "--workdir", str(runs / "qat"), "--prompt", PROMPT, "--max-new-tokens",
               str(NEW), "--temperature", "0.7", "--top-k", "5", "--seed", "3"]) == 0
  out = capsys.readouterr()
  assert out.out == _text(want) + "\n" and "Switch sampled, seed 3" in out.err
  # A bad sampling flag is one line; a sentinel the model does not have too.
  for extra, message in ((["--temperature", "0.7", "--top-p", "0"], "--top-p 0"),
                         (["--prompt", "x <extra_id_64>"], "use <extra_id_0> .. <extra_id_63>")):
    argv = ["generate", "--packed", str(runs / "packed"), "--max-new-tokens", "2", *extra]
    if "--prompt" not in extra:
      argv += ["--prompt", PROMPT]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeqjax: error:") and "\n" not in err and message in err, err


def test_compressed_tensors_export_loads_in_transformers(runs, student, capsys):
  pytest.importorskip("transformers")
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra")
  from moeqjax.convert.runtimes import load_compressed_tensors
  model, fake_quant, teacher = student
  _run("export", "--workdir", runs / "qat", "--format", "compressed-tensors",
       "--out", runs / "ct")
  _run("export", "--packed", runs / "packed", "--format", "compressed-tensors",
       "--out", runs / "ct_packed")
  assert "as compressed-tensors (int2 experts)" in capsys.readouterr().out
  weights = [(runs / d / "model.safetensors").read_bytes() for d in ("ct", "ct_packed")]
  assert weights[0] == weights[1]  # the packed folder's stored codes are the workdir's
  ct = load_compressed_tensors(runs / "ct")
  enc = np.asarray([_prompt_ids()])
  dec = np.asarray([[0, *_prompt_ids()[:7]]])
  ours = _logits(model, fake_quant, enc, dec)
  diff = np.abs(_torch_logits(ct, enc, dec) - ours).max()
  assert diff <= 1e-5, diff
  assert np.abs(_logits(model, teacher, enc, dec) - ours).max() > 1e-3  # the codes matter


def test_hf_export_loads_in_transformers(runs, student):
  transformers = pytest.importorskip("transformers")
  model, fake_quant, _ = student
  _run("export", "--workdir", runs / "qat", "--format", "hf", "--out", runs / "hf")
  _run("export", "--packed", runs / "packed", "--out", runs / "hf_packed")
  weights = [(runs / d / "model.safetensors").read_bytes() for d in ("hf", "hf_packed")]
  assert weights[0] == weights[1]
  hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
      runs / "hf", dtype="float32").eval()
  enc = np.asarray([_prompt_ids()])
  dec = np.asarray([[0, *_prompt_ids()[3:9]]])
  diff = np.abs(_torch_logits(hf, enc, dec) - _logits(model, fake_quant, enc, dec)).max()
  assert diff <= 1e-4, diff


def test_gguf_is_refused_in_one_line_and_writes_nothing(runs, capsys):
  for source in (["--workdir", runs / "qat"], ["--packed", runs / "packed"]):
    out = runs / "refused" / "model.gguf"
    capsys.readouterr()
    assert main(["export", *map(str, source), "--format", "gguf", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("moeqjax: error: GGUF has no Switch Transformer") and "\n" not in err
    assert not (runs / "refused").exists()
