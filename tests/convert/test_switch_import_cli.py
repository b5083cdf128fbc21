"""`moeqjax import-hf` of a Switch Transformers checkpoint, then qat / eval / export from it through the CLI."""

import json

import ml_collections
import numpy as np
import pytest

from moeqjax.cli import main
from moeqjax.eval import evaluate_seq2seq
from moeqjax.model import SwitchTransformer
from moeqjax.pipeline.import_hf import load_imported_params
from moeqjax.pipeline.config import switch_config
from moeqjax.pipeline.switch_phases import Seq2SeqData
from moeqjax.pipeline.workdirs import load_data

from switch_micro import REPO, restore

pytest.importorskip("transformers", reason="needs the `parity` extra")
from switch_models import build_switch_model, hf_forward  # noqa: E402

# Bytes (0..255) and 64 sentinels above them, as configs/switch_tiny.py's data expects.
SHAPES = dict(vocab_size=320, d_model=16, d_kv=8, d_ff=24, num_heads=2, num_layers=2,
              num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
              num_experts=4, expert_capacity=64, eos_token_id=5)  # eos: a field export must keep
# The phases' own sections at a test's size (the imported config is configs/switch_tiny.py's).
SMALL = ["--config.seq2seq.window=48", "--config.qat.seq_len=48", "--config.qat.steps=2",
         "--config.qat.warmup_steps=1", "--config.qat.batch_size=4", "--config.qat.ckpt_every=0"]
EVAL = ["--config.eval.num_batches=2", "--config.eval.batch_size=4"]


def _run(*args):
  assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  w = tmp_path_factory.mktemp("switch_import")
  model = build_switch_model(seed=3, **SHAPES)
  model.save_pretrained(w / "hf")
  _run("import-hf", "--hf-dir", w / "hf", "--out", w / "imp", *SMALL[:1])
  # The paper's protocol: fine-tune the imported model on (text, summary) pairs.
  pairs = w / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"text": f"the report {i} says {i % 3} things",
                                       "summary": f"report {i}: {i % 3}"}) + "\n"
                           for i in range(16)))
  _run("qat", "--teacher", w / "imp", "--workdir", w / "q", *SMALL[1:],
       f"--config.seq2seq.pairs={pairs}", "--config.seq2seq.source_len=24",
       "--config.seq2seq.target_len=8", "--config.data.valid_fraction=0.25")
  _run("eval", "--workdir", w / "q", *EVAL)
  _run("export", "--workdir", w / "q", "--format", "hf", "--out", w / "exported")
  return w, model


def test_imported_teacher_computes_as_transformers(runs):
  w, model = runs
  marker = json.loads((w / "imp" / "hf_import.json").read_text())
  assert marker["model_type"] == "switch_transformers" and marker["model"]["num_experts"] == 4
  config = ml_collections.ConfigDict(marker["defaults"])
  cfg = switch_config(config)
  params = load_imported_params(w / "imp", cfg)
  enc = np.random.default_rng(0).integers(2, 256, (2, 11)).astype(np.int32)
  dec = np.random.default_rng(1).integers(2, 256, (2, 7)).astype(np.int32)
  ours = np.asarray(SwitchTransformer(cfg).apply({"params": params}, enc, dec)[0])
  theirs = hf_forward(model, enc, dec).logits.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_qat_from_the_import_needs_no_config_and_eval_scores_its_teacher(runs):
  w, _ = runs
  record = json.loads((w / "q" / "config.json").read_text())
  assert record["teacher"] == str(w / "imp") and record["seq2seq"]["window"] == 48
  assert record["seq2seq"]["pairs"] == str(w / "pairs.jsonl")
  assert record["model"]["vocab_size"] == 320 and record["qat"]["steps"] == 2
  result = json.loads((w / "q" / "eval.json").read_text())
  # the held-out batches, rebuilt from the whole config the run recorded
  config = ml_collections.ConfigDict(json.loads((w / "q" / "config.json").read_text())["defaults"])
  config.eval.update(dict(num_batches=2, batch_size=4))
  cfg = switch_config(config)
  batches = Seq2SeqData(config, cfg, load_data(config)).eval_batches()
  teacher = evaluate_seq2seq(cfg, {"params": load_imported_params(w / "imp", cfg)}, batches)
  assert result["full_precision"]["bits_per_token"] == pytest.approx(teacher["bits_per_token"],
                                                                     rel=1e-6)
  if "rouge" in result["student"] and "skipped" not in result["student"]["rouge"]:
    assert result["student"]["rouge"]["examples"] == 4  # the held-out quarter of 16 pairs


def test_exported_student_loads_in_transformers_as_our_fake_quant_student(runs):
  w, _ = runs
  import transformers
  exported = transformers.AutoModelForSeq2SeqLM.from_pretrained(str(w / "exported")).float().eval()
  original = json.loads((w / "hf" / "config.json").read_text())
  written = json.loads((w / "exported" / "config.json").read_text())
  assert written["model_type"] == "switch_transformers"
  assert written["eos_token_id"] == original["eos_token_id"]
  config = ml_collections.ConfigDict(json.loads((w / "q" / "config.json").read_text())["defaults"])
  cfg = switch_config(config)
  _, params, quant = restore_student(w, config)
  enc = np.random.default_rng(2).integers(2, 256, (2, 9)).astype(np.int32)
  dec = np.random.default_rng(3).integers(2, 256, (2, 5)).astype(np.int32)
  ours = np.asarray(SwitchTransformer(cfg).apply({"params": params, "quant": quant}, enc, dec)[0])
  np.testing.assert_allclose(hf_forward(exported, enc, dec).logits.numpy(), ours, atol=1e-4,
                             rtol=0)


def restore_student(w, config):
  """(cfg, params, quant) of the QAT run's checkpoint, restored by the library from its config."""
  path = w / "student_config.py"
  path.write_text("import json, ml_collections\n"
                  f"def get_config():\n  return ml_collections.ConfigDict(json.loads({json.dumps(json.dumps(config.to_dict()))}))\n")
  return restore(path, w / "q", 2, "qat")


def test_bad_switch_imports_are_one_line(runs, tmp_path, capsys):
  w, _ = runs
  _run_fails = lambda *a: main([str(x) for x in a])  # noqa: E731
  # into a folder that holds an import already
  assert _run_fails("import-hf", "--hf-dir", w / "hf", "--out", w / "imp") == 2
  assert "already holds an imported checkpoint" in capsys.readouterr().err
  # a decoder-only config for a Switch checkpoint
  assert _run_fails("import-hf", "--hf-dir", w / "hf", "--out", tmp_path / "x", "--config",
                    REPO / "configs" / "tiny.py") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is a Switch Transformers checkpoint" in err
  # a checkpoint with an expert missing
  import safetensors.numpy as stn
  import shutil
  broken = tmp_path / "broken"
  shutil.copytree(w / "hf", broken)
  tensors = stn.load_file(str(broken / "model.safetensors"))
  name = next(n for n in tensors if "experts.expert_2.wi" in n)
  del tensors[name]
  stn.save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
  assert _run_fails("import-hf", "--hf-dir", broken, "--out", tmp_path / "y") == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "expert_2" in err
