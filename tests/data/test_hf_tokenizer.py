"""HF tokenizer.json tokenizers and the corpus -> token stream step (vocab checks, separators)."""

import json

import numpy as np
import pytest

from moeqjax.data import (ByteTokenizer, DataError, HFTokenizer, encode_corpus, load_corpus,
                          make_tokenizer)

tokenizers = pytest.importorskip("tokenizers", reason="needs the `data` extra (tokenizers)")

WORDS = "the quick brown fox jumps over lazy dog line"


def build_tokenizer(folder, eos=None):
  """A WordLevel tokenizer.json trained offline on WORDS; ids: [UNK]=0, <|endoftext|>=1, <pad>=2."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["[UNK]", "<|endoftext|>", "<pad>"])
  tok.train_from_iterator([WORDS], trainer=trainer)
  folder.mkdir(parents=True, exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  if eos is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))
  return folder


def test_hf_tokenizer_encodes_decodes_and_finds_the_separator(tmp_path):
  tok = make_tokenizer(str(build_tokenizer(tmp_path / "tok")))
  assert isinstance(tok, HFTokenizer)
  assert tok.vocab_size == 3 + len(WORDS.split())
  assert tok.separator_id == 1  # <|endoftext|>, found by name
  ids = tok.encode("the lazy fox zebra")
  assert ids.dtype == np.int32 and ids.shape == (4,)
  assert ids[-1] == 0  # unknown word -> [UNK]
  assert tok.decode(ids[:3]) == "the lazy fox"
  # the file itself works as well as its folder
  assert make_tokenizer(str(tmp_path / "tok" / "tokenizer.json")).vocab_size == tok.vocab_size


def test_eos_from_tokenizer_config_wins(tmp_path):
  folder = build_tokenizer(tmp_path / "tok", eos={"content": "<pad>"})
  assert make_tokenizer(str(folder)).separator_id == 2


def test_bad_tokenizer_paths(tmp_path):
  with pytest.raises(DataError, match="no tokenizer file"):
    make_tokenizer(str(tmp_path))
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(DataError, match="cannot read"):
    make_tokenizer(str(tmp_path))
  assert isinstance(make_tokenizer(""), ByteTokenizer)
  assert isinstance(make_tokenizer("bytes"), ByteTokenizer)


def test_encode_corpus_joins_documents_with_the_separator(tmp_path):
  tok = make_tokenizer(str(build_tokenizer(tmp_path / "tok")))
  texts = [f"the {w} fox line" for w in WORDS.split()] * 4
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  corpus = load_corpus(path, valid_fraction=0.3)
  tc = encode_corpus(corpus, tok, model_vocab_size=64)
  assert tc.unit == "token" and tc.vocab_size == tok.vocab_size
  assert tc.train.dtype == np.int32 and not tc.train.flags.writeable
  train_docs = corpus.train.tobytes().split(b"\x00")
  expected = []
  for i, d in enumerate(train_docs):
    expected += ([1] if i else []) + tok.encode(d.decode()).tolist()
  np.testing.assert_array_equal(tc.train, expected)
  assert tc.fingerprint["tokenizer"] == tok.name
  assert tc.fingerprint["train_tokens"] == tc.train.size
  assert tc.fingerprint["sha256"] == corpus.fingerprint["sha256"]
  assert tc.valid.size == len(corpus.valid.tobytes().split(b"\x00")) * 5 - 1


def test_vocab_checks(tmp_path):
  tok = make_tokenizer(str(build_tokenizer(tmp_path / "tok")))
  path = tmp_path / "c.txt"
  path.write_text("the quick brown fox\n" * 50)
  corpus = load_corpus(path, valid_fraction=0.2)
  with pytest.raises(DataError, match=rf"has {tok.vocab_size} ids but the model's vocab_size is 8"):
    encode_corpus(corpus, tok, model_vocab_size=8)
  with pytest.raises(DataError, match="model.vocab_size >= 256"):
    encode_corpus(corpus, ByteTokenizer(), model_vocab_size=128)
  # exactly the tokenizer's vocab is enough
  assert encode_corpus(corpus, tok, model_vocab_size=tok.vocab_size).train.max() < tok.vocab_size


def test_byte_tokenizer_keeps_the_corpus_arrays(tmp_path):
  path = tmp_path / "c.txt"
  path.write_text("héllo wörld\n" * 50)
  corpus = load_corpus(path, valid_fraction=0.2)
  tc = encode_corpus(corpus, ByteTokenizer(), model_vocab_size=256)
  assert tc.unit == "byte" and tc.train is corpus.train and tc.valid is corpus.valid
  assert tc.fingerprint == dict(corpus.fingerprint, tokenizer="bytes", vocab_size=256)
