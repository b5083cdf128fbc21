"""The run remembers: overrides given once (at pretrain) hold for every later phase, and wrong inputs are one-line errors."""

import json
import pathlib

import numpy as np
import pytest

from moeqjax.cli import main

# Given once, to pretrain: the model's shapes, the data and the pretraining schedule.
MODEL = ["--config.model.d_model=16", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.head_dim=8", "--config.model.d_ff=32", "--config.model.num_experts=4"]
PRETRAIN = ["--config.pretrain.steps=6", "--config.pretrain.warmup_steps=1",
            "--config.pretrain.batch_size=4", "--config.pretrain.seq_len=32"]
# The new phase's own sections (never the model's): a short QAT and a small evaluation.
QAT = ["--config.qat.steps=3", "--config.qat.warmup_steps=1", "--config.qat.batch_size=4",
       "--config.qat.seq_len=32"]
EVAL = ["--config.eval.num_windows=4", "--config.eval.seq_len=32", "--config.eval.batch_size=4"]


def _one_line_error(capsys, argv, words):
  code = main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert code == 2, (argv, err)
  assert err.startswith("moeqjax: error:") and err.count("\n") == 1, err
  assert "Traceback" not in err
  for w in ([words] if isinstance(words, str) else words):
    assert w in err, (w, err)
  return err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """pretrain (fp/) with overrides, then qat (q/) given only --teacher and its own section."""
  root = tmp_path_factory.mktemp("remembers")
  data = root / "corpus.txt"
  data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                          for i in range(400)))
  assert main(["pretrain", "--workdir", str(root / "fp"), "--data", str(data), *MODEL,
               *PRETRAIN]) == 0
  assert main(["qat", "--workdir", str(root / "q"), "--teacher", str(root / "fp"), *QAT]) == 0
  return root


def test_qat_takes_the_teachers_model_data_and_step_count(runs):
  record = json.loads((runs / "q" / "config.json").read_text())
  assert record["model"]["d_model"] == 16 and record["model"]["num_experts"] == 4
  assert record["data"]["path"] == str(runs / "corpus.txt")  # the teacher's corpus, absolute
  assert record["teacher"] == str(runs / "fp")
  assert record["qat"]["steps"] == 3


def test_every_phase_after_pretrain_needs_no_repeated_override(runs, capsys, monkeypatch):
  fp, q = runs / "fp", runs / "q"
  # rerunning (or --resume) a finished run reads its own record: no override is repeated
  assert main(["pretrain", "--workdir", str(fp)]) == 0
  assert "pretrained 6 steps" in capsys.readouterr().out
  assert main(["qat", "--workdir", str(q), "--teacher", str(fp), "--resume"]) == 0
  assert "QAT finished at step 3" in capsys.readouterr().out
  # eval: the student's config and its recorded teacher (no --teacher, no model overrides)
  assert main(["eval", "--workdir", str(q), *EVAL]) == 0
  said = capsys.readouterr().out
  result = json.loads((q / "eval.json").read_text())
  assert result["student"]["unit"] == "byte" and "bits/byte" in said
  assert result["student"]["expert_bytes"] == 2 * 4 * (192 + 192 + 160)  # 4 experts of d=16
  # ptq (GPTQ's grid is a new-phase quant setting), then qat --init-from it without repeating it
  ptq = runs / "ptq"
  assert main(["ptq", "--workdir", str(ptq), "--teacher", str(fp), "--method", "gptq",
               "--calib-batches", "1", "--config.quant.scale_init=absmax"]) == 0
  assert "gptq calibration" in capsys.readouterr().err  # ptq shows its progress
  assert main(["eval", "--workdir", str(ptq), *EVAL]) == 0
  assert main(["qat", "--workdir", str(runs / "q_init"), "--teacher", str(fp), "--init-from",
               str(ptq), *QAT]) == 0
  init_record = json.loads((runs / "q_init" / "config.json").read_text())
  assert init_record["quant"]["scale_init"] == "absmax"
  # stats and allocate read the recorded run
  assert main(["stats", "--workdir", str(q)]) == 0
  stats = json.loads((q / "router_stats.json").read_text())
  assert np.asarray(stats["count"]).shape == (2, 4)
  assert main(["allocate", "--workdir", str(q), "--method", "frequency", "--budget", "2.5",
               "--budget-unit", "code_bits"]) == 0
  assert main(["qat", "--workdir", str(runs / "q_mixed"), "--teacher", str(fp), "--allocation",
               str(q / "allocation.json"), *QAT]) == 0
  capsys.readouterr()
  # pack and generate with default flags, from another working directory: packed = fake quant
  elsewhere = runs / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  assert main(["pack", "--workdir", str(q), "--out", str(runs / "packed")]) == 0
  capsys.readouterr()
  prompt = ["--prompt", "line 12: the quick", "--max-new-tokens", "12"]
  assert main(["generate", "--workdir", str(q), *prompt]) == 0
  from_workdir = capsys.readouterr().out
  assert main(["generate", "--packed", str(runs / "packed"), *prompt]) == 0
  assert capsys.readouterr().out == from_workdir
  assert from_workdir.startswith("line 12: the quick") and len(from_workdir) > len("line 12: the quick")
  # export: HF layout without further flags
  assert main(["export", "--workdir", str(q), "--format", "hf", "--out",
               str(runs / "hf_out")]) == 0
  assert (runs / "hf_out" / "config.json").is_file()
  # with its tokenizer: our UTF-8 bytes as a byte-level tokenizer.json that transformers reads
  transformers = pytest.importorskip("transformers", reason="needs the `parity` extra")
  tok = transformers.AutoTokenizer.from_pretrained(str(runs / "hf_out"))
  text = "line 12: caf\u00e9 \u2260 \U0001f642"
  assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())
  assert tok.decode(list(text.encode())) == text and tok.eos_token_id == 0


def test_compressed_tensors_export_needs_no_repeated_override(runs):
  # (GGUF cannot hold this d=16 model: its blocks are 32 and 256 wide; tests/convert covers it.)
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra")
  assert main(["export", "--workdir", str(runs / "q"), "--format", "compressed-tensors", "--out",
               str(runs / "ct")]) == 0
  assert json.loads((runs / "ct" / "config.json").read_text())["hidden_size"] == 16


def _allocation(path, layers, experts, code=1):
  table = {str(l): {str(e): code for e in range(experts)} for l in range(layers)}
  path.write_text(json.dumps({"codes": table}))
  return path


def test_wrong_inputs_are_one_line_errors(runs, capsys, tmp_path):
  fp, q = runs / "fp", runs / "q"
  qat = ["qat", "--workdir", tmp_path / "new"]
  # 1. an override that contradicts the teacher's recorded model
  _one_line_error(capsys, [*qat, "--teacher", fp, "--config.model.d_model=32"],
                  ["was made with another config", "model.d_model=32 (the run has 16)"])
  # 2. a QAT student as the teacher (the message names the student's own teacher)
  _one_line_error(capsys, [*qat, "--teacher", q],
                  ["is a `moeqjax qat` student, not a `moeqjax pretrain` run", f"teacher was {fp}"])
  # 3. a folder that is no run at all
  (tmp_path / "empty").mkdir()
  _one_line_error(capsys, [*qat, "--teacher", tmp_path / "empty"], "not a moeqjax run")
  # 4. a teacher that does not exist
  _one_line_error(capsys, [*qat, "--teacher", tmp_path / "nope"], "does not exist")
  # 5. an allocation for 2 x 8 experts on a 2 x 4-expert model
  _one_line_error(capsys, [*qat, "--teacher", fp, "--allocation",
                           _allocation(tmp_path / "a8.json", 2, 8)],
                  "allocates 2 layers x 8 experts, but the model has 2 layers x 4 experts")
  # 6. an allocation for too few layers
  _one_line_error(capsys, [*qat, "--teacher", fp, "--allocation",
                           _allocation(tmp_path / "a1.json", 1, 4)], "is not an allocation for")
  # 7. an allocation with a code no expert can have
  _one_line_error(capsys, [*qat, "--teacher", fp, "--allocation",
                           _allocation(tmp_path / "a7.json", 2, 4, code=7)], "unsupported bit code 7")
  # 8. an allocation that is not JSON
  (tmp_path / "bad.json").write_text("{codes")
  _one_line_error(capsys, [*qat, "--teacher", fp, "--allocation", tmp_path / "bad.json"],
                  "is not an allocation for 2 layers x 4 experts")
  # 9. --init-from a pretraining run
  _one_line_error(capsys, [*qat, "--teacher", fp, "--init-from", fp],
                  "is a `moeqjax pretrain` run, not a `moeqjax ptq` student")
  # 10. eval of a pretraining run
  _one_line_error(capsys, ["eval", "--workdir", fp],
                  "is a `moeqjax pretrain` run, not a `moeqjax qat` student or a `moeqjax ptq`")
  # 11. eval with an override that contradicts the student's step count
  _one_line_error(capsys, ["eval", "--workdir", q, "--config.qat.steps=5"],
                  "qat.steps=5 (the run has 3)")
  # 12. eval against a teacher with another model
  other = runs / "fp_other"
  if not other.exists():
    assert main(["pretrain", "--workdir", str(other), "--data", str(runs / "corpus.txt"),
                 *MODEL, *PRETRAIN, "--config.model.d_ff=16"]) == 0
    capsys.readouterr()
  _one_line_error(capsys, ["eval", "--workdir", q, "--teacher", other],
                  "have different models (fields differ: d_ff)")
  # 13. stats with an override that contradicts the run
  _one_line_error(capsys, ["stats", "--workdir", q, "--config.model.num_experts=8"],
                  "model.num_experts=8 (the run has 4)")
  # 14, 15, 16. allocate with codes no expert can have, or given twice
  alloc = ["allocate", "--workdir", q, "--method", "exact", "--budget", "3"]
  _one_line_error(capsys, [*alloc, "--choices", "1,5"], "code 5 is not an expert code")
  _one_line_error(capsys, [*alloc, "--choices", "0,2"], "code 0 is not an expert code")
  _one_line_error(capsys, [*alloc, "--choices", "2,2,4"], "a code is given twice")
  # 17. generate with a prompt that is not UTF-8 (argv bytes arrive as surrogate escapes)
  _one_line_error(capsys, ["generate", "--workdir", q, "--prompt", "caf\udce9"],
                  "--prompt holds bytes that are not UTF-8 text")
  # 18. generate with a tokenizer the byte-level model was not made with
  tokenizers = pytest.importorskip("tokenizers", reason="needs the `data` extra")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
  (tmp_path / "tok").mkdir()
  tok.save(str(tmp_path / "tok" / "tokenizer.json"))
  _one_line_error(capsys, ["generate", "--workdir", q, "--prompt", "a", "--tokenizer",
                           tmp_path / "tok"], "which was made with UTF-8 bytes")
  # 19. qat whose --tokenizer is not the teacher's
  _one_line_error(capsys, [*qat, "--teacher", fp, "--tokenizer", tmp_path / "tok"],
                  "does not match --teacher")
  # 20. pack of a pretraining run (a full-precision model has no codes to pack)
  _one_line_error(capsys, ["pack", "--workdir", fp, "--out", tmp_path / "p"],
                  "is not a `moeqjax qat` run")
  # 21. generate from a folder that is no run
  _one_line_error(capsys, ["generate", "--workdir", tmp_path / "empty", "--prompt", "a"],
                  "is not a moeqjax run")
  # 22. a packed folder whose manifest does not match its tensors
  packed = tmp_path / "packed"
  assert main(["pack", "--workdir", str(q), "--out", str(packed)]) == 0
  manifest = json.loads((packed / "manifest.json").read_text())
  manifest["model_config"]["d_ff"] = 24
  (packed / "manifest.json").write_text(json.dumps(manifest))
  capsys.readouterr()
  _one_line_error(capsys, ["generate", "--packed", packed, "--prompt", "a"], str(packed))
  assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_progress_label_names_qat_once():
  from moeqjax.pipeline.qat import _progress_label
  assert _progress_label(pathlib.Path("runs/qat")) == "qat"
  assert _progress_label(pathlib.Path("runs/qat_ternary")) == "qat_ternary"
  assert _progress_label(pathlib.Path("runs/student")) == "qat student"
