"""Multi-host data loading: each simulated host gets a disjoint shard; together they are the whole."""

import json

import numpy as np
import pytest

from moeqjax.data import DataError, load_corpus, sample_batch, shard_bytes

DOC_TEXTS = [f"record {i} " + "xyz " * (i % 5) for i in range(50)]


def _docs(arr):
  return arr.tobytes().split(b"\x00")


@pytest.fixture(name="jsonl")
def _jsonl(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in DOC_TEXTS))
  return path


@pytest.mark.parametrize("hosts", [2, 3])
def test_document_shards_are_disjoint_and_cover_the_train_split(jsonl, hosts):
  whole = load_corpus(jsonl, valid_fraction=0.2)
  shards = [load_corpus(jsonl, valid_fraction=0.2, process_index=i, process_count=hosts)
            for i in range(hosts)]
  parts = [_docs(s.train) for s in shards]
  assert sorted(d for p in parts for d in p) == sorted(_docs(whole.train))  # union, no repeats
  assert all(len(set(p) & set(q)) == 0 for i, p in enumerate(parts) for q in parts[i + 1:])
  for i, s in enumerate(shards):
    np.testing.assert_array_equal(s.valid, whole.valid)  # validation is never sharded
    assert s.fingerprint["shard"] == f"{i}/{hosts}"
    assert s.fingerprint["sha256"] == whole.fingerprint["sha256"]
  assert "shard" not in whole.fingerprint


def test_single_host_is_unchanged(jsonl, tmp_path):
  a = load_corpus(jsonl, valid_fraction=0.2)
  b = load_corpus(jsonl, valid_fraction=0.2, process_index=0, process_count=1)
  np.testing.assert_array_equal(a.train, b.train)
  assert a.fingerprint == b.fingerprint


def test_text_file_is_cut_into_contiguous_parts(tmp_path):
  text = "".join(f"line {i} of the file\n" for i in range(300))
  path = tmp_path / "t.txt"
  path.write_text(text)
  whole = load_corpus(path, valid_fraction=0.1)
  parts = [load_corpus(path, valid_fraction=0.1, process_index=i, process_count=3).train.tobytes()
           for i in range(3)]
  assert b"".join(parts) == whole.train.tobytes()
  assert all(p.endswith(b"\n") and len(p) > 1000 for p in parts)
  assert shard_bytes(b"abc", 1, 2) == b""  # no line break after the midpoint: host 0 keeps it all


def test_batch_shards_concatenate_to_the_single_host_batch():
  tokens = np.arange(1000, dtype=np.uint8)
  whole = sample_batch(tokens, 8, 16, seed=3, step=5)
  parts = [sample_batch(tokens, 8, 16, 3, 5, process_index=i, process_count=4) for i in range(4)]
  assert all(p.shape == (2, 17) for p in parts)
  np.testing.assert_array_equal(np.concatenate(parts), whole)
  np.testing.assert_array_equal(sample_batch(tokens, 8, 16, 3, 5, 0, 1), whole)


def test_shard_errors(jsonl):
  with pytest.raises(DataError, match="not divisible by process_count 3"):
    sample_batch(np.arange(100), 8, 4, 0, 0, process_index=0, process_count=3)
  with pytest.raises(DataError, match="process_index"):
    load_corpus(jsonl, process_index=2, process_count=2)
  with pytest.raises(DataError, match="gets no train documents"):
    load_corpus(jsonl, valid_fraction=0.2, process_index=63, process_count=64)


def test_load_data_reads_the_whole_train_split_unless_given_a_shard(jsonl):
  from moeqjax.pipeline import config as config_io
  from moeqjax.pipeline import workdirs
  config = config_io.load_config(None)
  config.data.path = str(jsonl)
  config.data.valid_fraction = 0.2
  corpus = workdirs.load_data(config)  # every process reads all train documents
  np.testing.assert_array_equal(corpus.train, load_corpus(jsonl, valid_fraction=0.2).train)
  assert corpus.unit == "byte"
  half = workdirs.load_data(config, process_index=1, process_count=2)
  assert half.train.size < corpus.train.size
