"""A BPE tokenizer follows an imported HF checkpoint: import-hf -> qat -> eval -> generate (elsewhere) -> exports."""

import json

import numpy as np
import pytest

pytest.importorskip("torch", reason="building HF checkpoints needs torch (pip install -e .[parity])")
transformers = pytest.importorskip("transformers", reason="building HF checkpoints needs transformers")
tokenizers = pytest.importorskip("tokenizers", reason="needs the `data` extra (tokenizers)")

from moeqjax.cli import main  # noqa: E402
from moeqjax.data import make_tokenizer  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog, then sleeps by the river. "
QAT = ["--config.qat.steps=2", "--config.qat.warmup_steps=1", "--config.qat.batch_size=2",
       "--config.qat.seq_len=16"]
EVAL = ["--config.eval.num_windows=4", "--config.eval.seq_len=16", "--config.eval.batch_size=4"]


def _bpe_checkpoint(folder):
  """A random Mixtral (vocab 320, every row 32 wide: GGUF's Q4_0 holds it) and a byte-level BPE."""
  import torch
  cfg = transformers.MixtralConfig(
      vocab_size=320, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
      max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(0)
  transformers.AutoModelForCausalLM.from_config(cfg).float().save_pretrained(folder)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([TEXT] * 20, trainer)
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return folder


def test_the_checkpoints_tokenizer_is_used_everywhere(tmp_path, capsys, monkeypatch):
  src = _bpe_checkpoint(tmp_path / "src")
  bpe = make_tokenizer(str(src))
  data = tmp_path / "corpus.txt"
  data.write_text("".join(f"{TEXT}{i}\n" for i in range(200)))
  imp, q = tmp_path / "imp", tmp_path / "q"
  assert main(["import-hf", "--hf-dir", str(src), "--out", str(imp)]) == 0
  assert f"its tokenizer in {imp / 'tokenizer'}" in capsys.readouterr().out
  assert (imp / "tokenizer" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
  # qat: no --config, no --tokenizer; int4 experts (a new-phase setting) so that GGUF holds them
  assert main(["qat", "--teacher", str(imp), "--workdir", str(q), "--data", str(data), *QAT,
               "--config.quant.expert_code=4"]) == 0
  record = json.loads((q / "config.json").read_text())
  assert record["data"]["tokenizer"] == str(imp / "tokenizer")
  assert record["model"]["vocab_size"] == 320
  # the run trained on BPE tokens: its first loss is near ln(300 ids), not a byte model's
  first = json.loads((q / "metrics.jsonl").read_text().splitlines()[0])
  assert np.isfinite(first["train/task"])
  assert main(["eval", "--workdir", str(q), *EVAL]) == 0
  said = capsys.readouterr().out
  assert json.loads((q / "eval.json").read_text())["student"]["unit"] == "token"
  assert "bits/token" in said
  # the student carries its own copy: it still generates after the import folder moves away,
  # from another working directory
  imp.rename(tmp_path / "imp_moved")
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  monkeypatch.chdir(elsewhere)
  prompt = ["--prompt", "the lazy dog", "--max-new-tokens", "6"]
  assert main(["generate", "--workdir", str(q), *prompt]) == 0
  text = capsys.readouterr().out
  assert text.startswith("the lazy dog")
  assert main(["pack", "--workdir", str(q), "--out", str(tmp_path / "packed")]) == 0
  capsys.readouterr()
  assert main(["generate", "--packed", str(tmp_path / "packed"), *prompt]) == 0
  assert capsys.readouterr().out == text
  # the same tokenizer given explicitly is accepted (compared by content, not by path)
  assert main(["generate", "--workdir", str(q), *prompt, "--tokenizer", str(src)]) == 0
  assert capsys.readouterr().out == text
  # every export carries the tokenizer its runtime reads
  assert main(["export", "--workdir", str(q), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  assert hf_tok("the lazy fox", add_special_tokens=False)["input_ids"] == \
      bpe.encode("the lazy fox").tolist()
  assert hf_tok.eos_token == "<|endoftext|>"
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra")
  assert main(["export", "--workdir", str(q), "--format", "compressed-tensors", "--out",
               str(tmp_path / "ct")]) == 0
  assert (tmp_path / "ct" / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
  assert (tmp_path / "ct" / "tokenizer_config.json").is_file()
  gguf = pytest.importorskip("gguf", reason="needs the `export` extra")
  assert main(["export", "--workdir", str(q), "--format", "gguf", "--out",
               str(tmp_path / "s.gguf")]) == 0
  reader = gguf.GGUFReader(str(tmp_path / "s.gguf"))
  field = reader.fields["tokenizer.ggml.tokens"]
  assert len(field.data) == 320  # the BPE vocabulary, padded to the model's rows
  merges = reader.fields["tokenizer.ggml.merges"]
  assert len(merges.data) > 0
