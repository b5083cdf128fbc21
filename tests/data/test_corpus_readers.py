"""Tests for loading local text files, folders and jsonl, and for their error messages."""

import json

import numpy as np
import pytest

from moeqjax.data import DataError, load_corpus, split_paths


def _docs(arr: np.ndarray) -> list[bytes]:
    return arr.tobytes().split(b"\x00")


def test_text_file_splits_at_a_line_break_near_the_end(tmp_path):
    lines = [f"line {i} of the text\n" for i in range(100)]
    path = tmp_path / "book.txt"
    path.write_text("".join(lines))
    c = load_corpus(str(path), valid_fraction=0.1)
    train, valid = c.train.tobytes(), c.valid.tobytes()
    assert train + valid == path.read_bytes()
    assert train.endswith(b"\n") and valid.startswith(b"line ")
    assert 0.08 < len(valid) / (len(train) + len(valid)) <= 0.1
    fp = c.fingerprint
    assert (fp["files"], fp["bytes"], fp["valid_bytes"]) == (1, len(train) + len(valid), len(valid))


def test_folder_reads_text_recursively_and_skips_binaries(tmp_path):
    texts = {f"sub{i % 3}/doc{i}.{['txt', 'md', 'py'][i % 3]}": f"document {i}\n" for i in range(40)}
    for rel, text in texts.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\x00\xff\xfe")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    c = load_corpus(tmp_path, valid_fraction=0.3)
    train_keys, valid_keys = split_paths(sorted(texts), 0.3)
    # Documents are in sorted path order, each on its side of the path split.
    assert _docs(c.train) == [texts[k].encode() for k in train_keys]
    assert _docs(c.valid) == [texts[k].encode() for k in valid_keys]
    fp = c.fingerprint
    assert (fp["files"], fp["train_files"], fp["valid_files"]) == (40, len(train_keys), len(valid_keys))
    assert fp["skipped_files"] == 1
    assert load_corpus(tmp_path, valid_fraction=0.3).fingerprint == fp


def test_jsonl_reads_the_text_field_by_record(tmp_path):
    records = [{"text": f"record {i}", "id": i} for i in range(60)]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records[:30]) + "\n\n" + "\n".join(json.dumps(r) for r in records[30:]))
    c = load_corpus(path, valid_fraction=0.2)
    train_keys, valid_keys = split_paths([str(i) for i in range(60)], 0.2)
    assert _docs(c.valid) == [f"record {k}".encode() for k in valid_keys]
    assert _docs(c.train) == [f"record {k}".encode() for k in train_keys]
    assert c.fingerprint["files"] == 60


def test_jsonl_custom_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"b{i}"}) for i in range(50)))
    assert b"b" in load_corpus(path, valid_fraction=0.2, text_field="body").valid.tobytes()


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.mark.parametrize("name,content,kwargs,words", [
    ("empty.txt", "", {}, ["empty"]),
    ("bin.txt", b"\xff\xfe\x00abc", {}, ["not UTF-8 text"]),
    ("one_line.txt", "no line break at all", {}, ["split is empty", "valid_fraction"]),
    ("bad.jsonl", '{"text": "ok"}\n{"text": oops}\n', {}, ["line 2", "not valid JSON"]),
    ("keys.jsonl", '{"body": "x", "id": 1}\n', {}, ["line 1", "no field 'text'", "'body', 'id'", "text_field"]),
    ("list.jsonl", '["text"]\n', {}, ["line 1", "not an object"]),
    ("num.jsonl", '{"text": 3}\n', {}, ["line 1", "not a string"]),
    ("blank.jsonl", "\n\n", {}, ["no text"]),
    ("frac.txt", "a\nb\n", {"valid_fraction": 0.0}, ["valid_fraction must be in (0, 1)"]),
])
def test_file_errors(tmp_path, name, content, kwargs, words):
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as err:
        load_corpus(str(path), **kwargs)
    for w in words:
        assert w in str(err.value)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.txt"))


def test_folder_without_text(tmp_path):
    _write(tmp_path, "a.bin", b"\x00\x01")
    with pytest.raises(DataError, match=r"no UTF-8 text files \(1 non-text"):
        load_corpus(tmp_path)
    hidden_only = _write(tmp_path, "only_hidden/.keep", "hidden files are not read\n").parent
    with pytest.raises(DataError, match=r"no UTF-8 text files \(0 non-text"):
        load_corpus(hidden_only)


def test_folder_with_empty_validation_split(tmp_path):
    # Two files cannot fill a 1% validation split unless one happens to hash there; "a" and "b" do not.
    _write(tmp_path, "a", "alpha\n")
    _write(tmp_path, "b", "beta\n")
    assert split_paths(["a", "b"], 0.01)[1] == []
    with pytest.raises(DataError, match="validation split is empty.*add more data or change valid_fraction"):
        load_corpus(tmp_path, valid_fraction=0.01)
