"""`--tokenizer DIR` on pretrain / qat / eval: a local tokenizer.json replaces bytes end to end."""

import json

import pytest

from moeqjax.cli import main

tokenizers = pytest.importorskip("tokenizers", reason="needs the `data` extra (tokenizers)")

TINY = ["--config.model.d_model=16", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.head_dim=8", "--config.model.d_ff=32", "--config.model.num_experts=4",
        "--config.model.vocab_size=32", "--config.pretrain.steps=3",
        "--config.pretrain.warmup_steps=1", "--config.pretrain.batch_size=2",
        "--config.pretrain.seq_len=16"]


def _tokenizer(folder):
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(["the quick brown fox jumps over lazy dog 0 1 2 3 4 5 6 7 8 9 :"],
                          trainer=tokenizers.trainers.WordLevelTrainer(
                              special_tokens=["[UNK]", "<|endoftext|>"]))
  folder.mkdir()
  tok.save(str(folder / "tokenizer.json"))
  return folder


def test_pretrain_with_a_tokenizer(tmp_path, capsys):
  tok = _tokenizer(tmp_path / "tok")
  data = tmp_path / "docs.jsonl"
  data.write_text("".join(json.dumps({"text": f"line {i % 10} : the lazy dog"}) + "\n"
                          for i in range(200)))
  args = ["pretrain", "--data", str(data), "--tokenizer", str(tok), *TINY]
  assert main([*args, "--workdir", str(tmp_path / "fp")]) == 0
  assert "pretrained 3 steps" in capsys.readouterr().out
  record = json.loads((tmp_path / "fp" / "config.json").read_text())
  assert record["data"]["tokenizer"] == str(tok)
  # 6 tokens per record (+ separator): the task loss starts near ln(32), not ln(256)
  first = json.loads((tmp_path / "fp" / "metrics.jsonl").read_text().splitlines()[0])
  assert first["train/task"] < 4.0
  # the model's vocab must hold every id of the tokenizer (21 here)
  assert main([*args[:-len(TINY)], *TINY, "--config.model.vocab_size=16",
               "--workdir", str(tmp_path / "small")]) == 2
  err = capsys.readouterr().err
  assert "has 21 ids but the model's vocab_size is 16" in err


def test_byte_data_needs_a_byte_vocab(tmp_path, capsys):
  data = tmp_path / "c.txt"
  data.write_text("hello world\n" * 100)
  assert main(["pretrain", "--data", str(data), *TINY, "--workdir", str(tmp_path / "w")]) == 2
  assert "byte-level data needs model.vocab_size >= 256" in capsys.readouterr().err
  assert main(["pretrain", "--data", str(data), "--tokenizer", str(tmp_path / "nope"), *TINY,
               "--workdir", str(tmp_path / "w")]) == 2
  assert "unknown tokenizer" in capsys.readouterr().err
