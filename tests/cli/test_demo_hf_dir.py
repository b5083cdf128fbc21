"""`moeqjax demo --hf-dir`: a tiny saved Mixtral replaces pretraining; the rest of the pipeline runs."""

import importlib.util
import json
import pathlib

import ml_collections
import pytest

from moeqjax.cli import main
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.qat import compiled_qat_step

# One QAT step: each QAT variant costs one train_step compile (~15 s on a busy 2-core CPU).
STEPS = ["--config.qat.steps=1", "--config.qat.warmup_steps=1", "--config.qat.batch_size=2",
         "--config.qat.seq_len=16", "--config.qat.log_every=1", "--config.eval.num_windows=2",
         "--config.eval.seq_len=16", "--config.eval.batch_size=2"]
WORDS = "the quick brown fox jumps over lazy dog line".split()


def _tiny_mixtral(path, vocab_size):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.MixtralConfig(
      vocab_size=vocab_size, hidden_size=16, intermediate_size=16, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
      max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(path)
  return path


def _word_tokenizer(folder):
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator([" ".join(WORDS) + " 0 1 2 3 4 5 6 7 8 9 :"],
                          trainer=tokenizers.trainers.WordLevelTrainer(
                              special_tokens=["[UNK]", "<|endoftext|>"]))
  tok.save(str(folder / "tokenizer.json"))


def test_demo_from_hf_checkpoint(tmp_path, capsys):
  """With the checkpoint's tokenizer.json (picked up since --tokenizer is not given).

  The byte path (vocab >= 256) shares all of this code but the tokenizer choice, which
  tests/data/test_hf_tokenizer.py covers; a second demo run would double this test's time.
  """
  from moeqjax.data import make_tokenizer
  hf_dir = _tiny_mixtral(tmp_path / "hf", vocab_size=32)
  _word_tokenizer(hf_dir)
  data = tmp_path / "corpus.txt"
  data.write_text("".join(f"line {i % 10} : the quick brown fox jumps over the lazy dog\n"
                          for i in range(300)))
  work = tmp_path / "demo"
  args = ["demo", "--hf-dir", str(hf_dir), "--data", str(data), "--workdir", str(work), *STEPS]
  assert main(args) == 0
  metrics = json.loads((work / "metrics.json").read_text())
  assert set(metrics["variants"]) == {"full_precision", "fp_continued", "rtn_int4", "rtn_ternary",
                                      "qat_ternary", "qat_int2", "qat_mixed"}
  assert metrics["unit"] == "token"
  assert metrics["data"]["vocab_size"] == make_tokenizer(str(hf_dir)).vocab_size == 22
  # the checkpoint's own tokenizer, as import-hf copied it into the import folder
  used = pathlib.Path(metrics["data"]["tokenizer"])
  assert used == (work / "hf_import" / "tokenizer" / "tokenizer.json").resolve()
  assert used.read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
  for r in metrics["variants"].values():
    assert r["perplexity"] == pytest.approx(2.718281828 ** r["nll"], rel=1e-6)
  # qat_mixed: an MC-MoE allocation within 2.5 code bits from fp_continued's statistics, trained.
  mixed, allocation = metrics["variants"]["qat_mixed"], metrics["allocations"]["qat_mixed"]
  assert allocation["method"] == "mc_moe" and allocation["within_budget"]
  assert mixed["expert_code_bits"] == pytest.approx(allocation["achieved"]["code_bits"])
  assert mixed["expert_code_bits"] <= 2.5
  assert json.loads((work / "qat_mixed" / "config.json").read_text())["expert_codes"] == \
      allocation["codes_LxE"]
  assert (work / "plots" / "bit_map_qat_mixed.png").stat().st_size > 0
  assert "bit_map_qat_mixed.png" in (work / "report.md").read_text()
  # Every delta has its paired standard error; the control's own delta is exactly 0.
  for r in metrics["variants"].values():
    assert r["delta_vs_fp_se"] is not None and r["delta_vs_fp_continued_se"] is not None
  assert metrics["variants"]["fp_continued"]["delta_vs_fp_continued"] == 0.0
  # Issue 18: the control's routing agreement and each student's quantization-only drift.
  control = metrics["variants"]["fp_continued"]
  for name in ("qat_ternary", "qat_int2", "qat_mixed"):
    r = metrics["variants"][name]
    assert r["control_topk_agree"] == pytest.approx(control["topk_agree"], abs=1e-12)
    assert r["drift_topk"] == pytest.approx(r["topk_agree"] - control["topk_agree"], abs=1e-12)
    assert r["drift_top1"] == pytest.approx(r["top1_agree"] - control["top1_agree"], abs=1e-12)
    assert r["drift_topk_se"] is not None and r["delta_vs_teacher"] == r["delta_vs_fp"]
  assert "top-k drift vs control" in (work / "report.md").read_text()
  # qat_gguf (one ggml type per expert tensor) is not run on this model, and the report says why:
  # its rows of 16 weights fit no ggml block (Q4_0 / Q8_0 need 32) and pack refuses F16 experts.
  reason = metrics["skipped"]["qat_gguf"]
  assert reason.startswith("`qat_gguf` not run: no ggml block type holds w_gate of this model")
  assert "rows of 16 input weights are not a multiple of its block of 32" in reason
  assert reason in (work / "report.md").read_text() and not (work / "qat_gguf").exists()
  # The four QAT runs differ only in their codes (traced data), so they share one compiled step
  # (tests/cli/test_demo_gguf.py: qat_gguf's [L, 3, E] codes, where it runs, compile a second).
  config = ml_collections.ConfigDict(json.loads((work / "qat_ternary" / "config.json").read_text()))
  _, optim = config_io.phase_configs(config.qat, "qat")
  step = compiled_qat_step(config_io.model_config(config), optim, config_io.loss_weights(config))
  assert step._cache_size() == 1
  assert not (work / "pretrain").exists() and (work / "hf_import" / "hf_import.json").is_file()
  assert "import" in metrics["timings_s"] and "pretrain" not in metrics["timings_s"]
  report = (work / "report.md").read_text()
  assert "bits/token" in report
  assert "| perplexity |" in report  # the column is shown for tokens (not for bytes)
  out = capsys.readouterr().out
  assert "bits/token" in out
  # The demo ends by serving: both students packed, bytes as accounted, a continuation printed.
  serving = metrics["serving"]
  for name in ("qat_ternary", "qat_int2"):
    packed = serving["packed"][name]
    assert packed["expert_tensor_bytes"] == metrics["variants"][name]["expert_bytes"]
    assert packed["fp_bf16_model_bytes"] == metrics["variants"]["full_precision"]["model_bytes"]
    assert (work / "packed" / name / "tokenizer.json").is_file()
    assert f"packed {name}" in out
  assert serving["sample"]["variant"] == "qat_ternary" and serving["sample"]["prompt"]
  assert "## Serving from packed weights" in report and "greedy continuation" in out
  # ...and deploys the packed ternary student: rows of 16 weights fit no ggml block (Q4_0 needs
  # 32), so the GGUF row says why it was not written; compressed-tensors is written and checked.
  deploy = metrics["deploy"]["qat_ternary"]
  assert deploy["gguf"]["file"] is None and deploy["gguf"]["note"].startswith("not written: ")
  ct = deploy["compressed_tensors"]
  assert ct["file_bytes"] == (work / "deploy" / "qat_ternary" / "compressed-tensors" /
                              "model.safetensors").stat().st_size
  if importlib.util.find_spec("compressed_tensors"):
    assert ct["loaded"] and ct["matched"] and ct["max_abs_logit_diff"] <= 1e-5
  assert "deploy" in metrics["timings_s"] and "## Deploy" in report
  qat_record = config.to_dict()
  assert qat_record["model"]["vocab_size"] == 32  # the checkpoint's model config, not tiny.py's
  assert qat_record["data"]["tokenizer"] == str(work / "hf_import" / "tokenizer")  # its copy
  # the QAT variants record their teacher, so `moeqjax eval --workdir` needs no --teacher
  recorded = json.loads((work / "qat_ternary" / "config.json").read_text())
  assert recorded["teacher"] == str(work / "hf_import")


def test_demo_hf_dir_errors(tmp_path, capsys):
  assert main(["demo", "--hf-dir", str(tmp_path), "--workdir", str(tmp_path / "w")]) == 2
  assert "has no config.json" in capsys.readouterr().err
