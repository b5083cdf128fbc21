"""Tests for the embedded stdlib corpus and the path-hash split."""

import zlib

import numpy as np
import pytest

from moeqjax.data import DataError, load_corpus, load_stdlib_corpus, split_paths, stdlib_files, stdlib_root


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus()


def test_splits_are_nonempty_byte_arrays(corpus):
    for arr in (corpus.train, corpus.valid):
        assert arr.dtype == np.uint8 and arr.ndim == 1
    # Python source is far larger than a few windows; a tiny split means files went missing.
    assert corpus.train.size > 1_000_000
    assert corpus.valid.size > 10_000
    assert corpus.fingerprint["source"].startswith("python-stdlib 3.")


def test_fingerprint_counts_add_up(corpus):
    fp = corpus.fingerprint
    paths = stdlib_files()
    train_paths, valid_paths = split_paths(paths, 0.05)
    assert fp["files"] == len(paths) == fp["train_files"] + fp["valid_files"]
    assert (fp["train_files"], fp["valid_files"]) == (len(train_paths), len(valid_paths))
    assert fp["bytes"] == fp["train_bytes"] + fp["valid_bytes"]
    assert (fp["train_bytes"], fp["valid_bytes"]) == (corpus.train.size, corpus.valid.size)
    # Each split is its files' bytes plus one separator between consecutive files.
    root = stdlib_root()
    expected = sum((root / p).stat().st_size for p in valid_paths) + len(valid_paths) - 1
    assert fp["valid_bytes"] == expected
    assert int((corpus.train == 0).sum()) == fp["train_files"] - 1
    assert len(fp["sha256"]) == 16


def test_excludes_tests_packages_and_caches(corpus):
    paths = stdlib_files()
    assert "os.py" in paths and "json/decoder.py" in paths
    for p in paths:
        parts = p.split("/")
        assert p.endswith(".py")
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"} & set(parts[:-1]), p
    assert paths == sorted(paths)


def test_load_is_deterministic(corpus):
    again = load_corpus(None)
    assert again.fingerprint == corpus.fingerprint
    np.testing.assert_array_equal(again.valid, corpus.valid)


def test_fake_stdlib_tree_exclusions(tmp_path):
    for rel in ["a.py", "pkg/b.py", "pkg/data.txt", "test/t.py", "pkg/tests/t.py", "idlelib/idle_test/t.py",
                "site-packages/x.py", "pkg/__pycache__/b.py"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(f"# {rel}\n")
    assert stdlib_files(tmp_path) == ["a.py", "pkg/b.py"]
    # crc32 buckets: "a.py" -> 502, "pkg/b.py" -> 613, so 0.6 (buckets < 600) splits them.
    c = load_stdlib_corpus(0.6, root=tmp_path)
    assert c.fingerprint["source"] == str(tmp_path)
    assert (c.train.tobytes(), c.valid.tobytes()) == (b"# pkg/b.py\n", b"# a.py\n")


def test_split_paths_is_a_stable_partition():
    paths = [f"dir{i % 7}/file_{i}.py" for i in range(5000)]
    train, valid = split_paths(paths, 0.05)
    assert set(train).isdisjoint(valid) and sorted(train + valid) == sorted(paths)
    assert 0.04 < len(valid) / len(paths) < 0.06
    # A key's side depends on the key alone: a subset keeps every assignment.
    sub_train, sub_valid = split_paths(paths[::3], 0.05)
    assert set(sub_valid) == set(valid) & set(paths[::3])
    assert set(sub_train) == set(train) & set(paths[::3])
    # Pinned to crc32 of the UTF-8 path, identical on every machine (unlike Python's salted hash()).
    assert [p for p in paths[:200] if zlib.crc32(p.encode()) % 1000 < 50] == split_paths(paths[:200], 0.05)[1]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_fraction_out_of_range(fraction):
    with pytest.raises(DataError, match=r"valid_fraction must be in \(0, 1\)"):
        split_paths(["a.py"], fraction)
