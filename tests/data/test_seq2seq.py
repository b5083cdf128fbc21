"""Seq2seq data: T5 span corruption against a hand example and a reconstruction oracle, and text->summary pairs."""

import json

import numpy as np
import pytest

from moeqjax.data import DataError
from moeqjax.data import seq2seq


def _reconstruct(enc, dec, sentinels):
  """The original window from (input, target): each sentinel in the input is replaced by the tokens
  that follow the same sentinel in the target."""
  sentinels = list(sentinels)
  spans, current = {}, None
  for t in dec.tolist():
    if t in sentinels:
      current = t
      spans[t] = []
    else:
      spans[current].append(t)
  out = []
  for t in enc.tolist():
    out.extend(spans[t] if t in sentinels else [t])
  return np.asarray(out)


def test_corrupt_spans_hand_example():
  tokens = np.arange(10, 20)
  mask = np.zeros(10, bool)
  mask[[2, 3, 7]] = True
  enc, dec = seq2seq.corrupt_spans(tokens, mask, [99, 98])
  assert enc.tolist() == [10, 11, 99, 14, 15, 16, 98, 18, 19]
  assert dec.tolist() == [99, 12, 13, 98, 17]


@pytest.mark.parametrize("length,density,mean", [(64, 0.15, 3.0), (20, 0.5, 2.0), (7, 0.15, 3.0),
                                                 (100, 0.3, 8.0)])
def test_noise_mask_counts_and_the_corruption_reconstructs(length, density, mean):
  sentinels = seq2seq.t5_sentinel_ids(1000, 100)
  num_noise, num_spans = seq2seq.span_counts(length, density, mean)
  for seed in range(20):
    rng = np.random.default_rng(seed)
    mask = seq2seq.noise_mask(rng, length, density, mean)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    assert mask.sum() == num_noise and starts.sum() == num_spans
    assert not mask[0] and mask[-1]  # kept tokens first, a noise span last (T5's interleaving)
    tokens = rng.integers(0, 900, size=length)
    enc, dec = seq2seq.corrupt_spans(tokens, mask, sentinels)
    assert (len(enc), len(dec)) == seq2seq.span_lengths(length, density, mean)
    np.testing.assert_array_equal(_reconstruct(enc, dec, sentinels), tokens)


def test_span_corruption_batch_is_fixed_size_and_a_function_of_seed_and_step():
  tokens = np.random.default_rng(0).integers(0, 200, size=5000).astype(np.int32)
  kw = dict(sentinel_ids=seq2seq.t5_sentinel_ids(256, 32), decoder_start_id=0)
  b = seq2seq.span_corruption_batch(tokens, 4, 64, seed=1, step=3, **kw)
  enc_len, dec_len = seq2seq.span_lengths(64, 0.15, 3.0)
  assert b.encoder_ids.shape == (4, enc_len) and b.targets.shape == (4, dec_len)
  assert b.target_mask.all() and b.decoder_ids[:, 0].tolist() == [0] * 4
  np.testing.assert_array_equal(b.decoder_ids[:, 1:], b.targets[:, :-1])
  again = seq2seq.span_corruption_batch(tokens, 4, 64, seed=1, step=3, **kw)
  np.testing.assert_array_equal(b.encoder_ids, again.encoder_ids)
  other = seq2seq.span_corruption_batch(tokens, 4, 64, seed=1, step=4, **kw)
  assert not np.array_equal(b.encoder_ids, other.encoder_ids)
  with pytest.raises(DataError, match="longer than its window"):
    seq2seq.span_corruption_batch(tokens[:50], 4, 64, seed=1, step=0, **kw)


def test_too_few_sentinels_is_one_line():
  mask = np.zeros(12, bool)
  mask[[1, 4, 8]] = True
  with pytest.raises(DataError) as err:
    seq2seq.corrupt_spans(np.arange(12), mask, [99, 98])
  assert len(str(err.value).splitlines()) == 1 and "3 noise spans" in str(err.value)


def _jsonl(path, records):
  path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  return path


def test_read_pairs_jsonl_and_a_missing_field(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", [{"text": "a long story", "summary": "short"},
                                       {"text": "café", "summary": "🙂"}])
  assert seq2seq.read_pairs(path) == [(b"a long story", b"short"),
                                      ("café".encode(), "🙂".encode())]
  bad = _jsonl(tmp_path / "bad.jsonl", [{"text": "x", "summary": "y"}, {"text": "z"}])
  with pytest.raises(DataError) as err:
    seq2seq.read_pairs(bad)
  msg = str(err.value)
  assert len(msg.splitlines()) == 1
  assert "line 2" in msg and "'summary'" in msg and "data.target_field" in msg
  with pytest.raises(DataError, match="data.source_field"):
    seq2seq.read_pairs(path, source_field="article")
  with pytest.raises(DataError, match="must be .jsonl"):
    seq2seq.read_pairs(_jsonl(tmp_path / "d.txt", [{"text": "x"}]))


def test_read_pairs_parquet_missing_column(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["a", "b"], "summary": ["c", "d"]}), tmp_path / "d.parquet")
  assert seq2seq.read_pairs(tmp_path / "d.parquet") == [(b"a", b"c"), (b"b", b"d")]
  pq.write_table(pa.table({"text": ["a"]}), tmp_path / "bad.parquet")
  with pytest.raises(DataError) as err:
    seq2seq.read_pairs(tmp_path / "bad.parquet")
  assert "'summary'" in str(err.value) and "--config.data.target_field" in str(err.value)


def test_pair_batch_pads_cuts_and_ends_with_eos():
  pairs = [(b"abcdef", b"xy"), (b"ab", b"uvwxyz")]
  b = seq2seq.pair_batch(pairs, 6, 4, 4, seed=0, step=0, encode=list, pad_id=0,
                         decoder_start_id=1, eos_id=2)
  for row in range(6):
    src, tgt = pairs[0] if b.encoder_ids[row, 0] == ord("a") and b.encoder_ids[row, 2] else pairs[1]
    want_src = list(src[:4]) + [0] * (4 - len(src[:4]))
    want_tgt = (list(tgt[:3]) + [2] + [0] * 4)[:4]
    assert b.encoder_ids[row].tolist() == want_src
    assert b.targets[row].tolist() == want_tgt
    assert b.target_mask[row].tolist() == [t != 0 for t in want_tgt]
    assert b.decoder_ids[row].tolist() == [1] + want_tgt[:3]
