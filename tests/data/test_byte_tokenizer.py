"""Tests for the byte tokenizer and the tokenizer protocol."""

import numpy as np
import pytest

from moeqjax.data import ByteTokenizer, DataError, Tokenizer, make_tokenizer


def test_round_trip_unicode():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text.encode("utf-8")),)
    assert ids.max() < tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(ids.tolist()) == text


def test_decode_cut_character_is_replaced():
    ids = ByteTokenizer().encode("é")  # two bytes; drop the second
    assert ByteTokenizer().decode(ids[:1]) == "\ufffd"


def test_decode_rejects_ids_outside_bytes():
    with pytest.raises(DataError, match="token id 300 is outside the byte range"):
        ByteTokenizer().decode(np.array([65, 300]))


def test_protocol_and_factory():
    tok = make_tokenizer("bytes")
    assert isinstance(tok, Tokenizer) and tok.name == "bytes"
    with pytest.raises(DataError, match="unknown tokenizer 'gpt2'.*use 'bytes'"):
        make_tokenizer("gpt2")
