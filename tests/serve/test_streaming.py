"""Streamed text: byte tokens through an incremental UTF-8 decoder, tokenizer.json ids by suffix."""

import io

import numpy as np
import pytest

from moeqjax.data import ByteTokenizer
from moeqjax.pipeline.serve import _Streamer


def test_byte_stream_holds_back_a_split_character_and_skips_end_of_text():
  out = io.StringIO()
  stream = _Streamer(ByteTokenizer(), 0, out)
  for b in "é!".encode("utf-8"):  # é is two bytes: nothing is shown after the first one
    stream(np.asarray([b]))
    if b == 0xC3:
      assert out.getvalue() == ""
  stream(np.asarray([0]))  # end of text is not printed
  assert out.getvalue() == "é!"


def test_tokenizer_json_stream_prints_each_new_suffix(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from moeqjax.data import HFTokenizer
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  tok.train_from_iterator(["the quick brown fox"], trainer=tokenizers.trainers.WordLevelTrainer(
      special_tokens=["[UNK]", "<|endoftext|>"]))
  tok.save(str(tmp_path / "tokenizer.json"))
  hf = HFTokenizer(tmp_path)
  out = io.StringIO()
  stream = _Streamer(hf, hf.separator_id, out)
  shown = []
  for word in ("quick", "brown", "fox"):
    stream(np.asarray(hf.encode(word)))
    shown.append(out.getvalue())
  stream(np.asarray([hf.separator_id]))
  assert shown == ["quick", "quick brown", "quick brown fox"]
  assert out.getvalue() == "quick brown fox"
