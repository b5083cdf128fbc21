"""Parquet / Arrow IPC / Feather corpora: same documents and split as .jsonl, streamed by batch."""

import json
import sys

import numpy as np
import pytest

from moeqjax.data import DataError, load_corpus

pa = pytest.importorskip("pyarrow", reason="needs the `data` extra (pyarrow)")
import pyarrow.feather  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

TEXTS = [f"document {i}: " + "abc " * (i % 7 + 1) for i in range(40)]


def _table(texts=TEXTS):
  return pa.table({"id": list(range(len(texts))), "text": texts})


def _jsonl_corpus(tmp_path, texts=TEXTS):
  path = tmp_path / "ref.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
  return load_corpus(path, valid_fraction=0.2)


def _write(kind, table, path):
  if kind == "parquet":
    pq.write_table(table, path, row_group_size=7)  # several row groups: read batch by batch
  elif kind == "arrow_file":
    with pa.ipc.new_file(path, table.schema) as w:
      for batch in table.to_batches(max_chunksize=9):
        w.write_batch(batch)
  elif kind == "arrow_stream":  # what HF `datasets` writes as .arrow
    with pa.ipc.new_stream(path, table.schema) as w:
      for batch in table.to_batches(max_chunksize=9):
        w.write_batch(batch)
  elif kind == "feather":
    pyarrow.feather.write_feather(table, path, chunksize=9)


SUFFIX = {"parquet": ".parquet", "arrow_file": ".arrow", "arrow_stream": ".arrow",
          "feather": ".feather"}


@pytest.mark.parametrize("kind", list(SUFFIX))
def test_table_files_match_jsonl(tmp_path, kind):
  path = tmp_path / f"data{SUFFIX[kind]}"
  _write(kind, _table(), path)
  corpus = load_corpus(path, valid_fraction=0.2)
  ref = _jsonl_corpus(tmp_path)
  np.testing.assert_array_equal(corpus.train, ref.train)
  np.testing.assert_array_equal(corpus.valid, ref.valid)
  assert corpus.fingerprint["files"] == len(TEXTS)
  assert corpus.fingerprint["sha256"] == ref.fingerprint["sha256"]


def test_other_text_column_and_nulls(tmp_path):
  path = tmp_path / "d.parquet"
  pq.write_table(pa.table({"body": TEXTS[:-1] + [None]}), path)
  corpus = load_corpus(path, valid_fraction=0.2, text_field="body")
  ref = _jsonl_corpus(tmp_path, TEXTS[:-1] + [""])  # a null text is an empty record
  np.testing.assert_array_equal(corpus.train, ref.train)
  np.testing.assert_array_equal(corpus.valid, ref.valid)


@pytest.mark.parametrize("kind", ["parquet", "arrow_stream"])
def test_missing_column_lists_the_columns(tmp_path, kind):
  path = tmp_path / f"d{SUFFIX[kind]}"
  _write(kind, _table(), path)
  with pytest.raises(DataError, match=r"no column 'body' \(columns present: 'id', 'text'\).*text_field"):
    load_corpus(path, text_field="body")


def test_non_string_column_and_garbage_file(tmp_path):
  path = tmp_path / "d.parquet"
  _write("parquet", _table(), path)
  with pytest.raises(DataError, match="column 'id' has type int64, not string"):
    load_corpus(path, text_field="id")
  bad = tmp_path / "bad.arrow"
  bad.write_bytes(b"this is not arrow at all" * 10)
  with pytest.raises(DataError, match="cannot read .*bad.arrow as arrow"):
    load_corpus(bad)


def test_missing_pyarrow_names_the_extra(tmp_path, monkeypatch):
  path = tmp_path / "d.parquet"
  _write("parquet", _table(), path)
  monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  with pytest.raises(DataError, match=r"needs pyarrow.*moeqjax\[data\]"):
    load_corpus(path)
