"""Tests for training batches, evaluation windows and the unigram baseline."""

import math

import numpy as np
import pytest

from moeqjax.data import DataError, eval_windows, sample_batch, unigram_bits_per_token

TOKENS = np.arange(10_000, dtype=np.int64)  # value == position, so a window names its own start


def test_sample_batch_shape_and_real_slices():
    batch = sample_batch(TOKENS, batch_size=8, seq_len=16, seed=0, step=3)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    assert batch.min() >= 0 and batch.max() < TOKENS.size
    u8 = np.frombuffer(b"hello world, a few bytes", dtype=np.uint8)
    row = sample_batch(u8, 1, 4, 0, 0)[0]
    assert row.dtype == np.int32 and bytes(row.astype(np.uint8)) in u8.tobytes()


def test_sample_batch_depends_only_on_seed_and_step():
    a = sample_batch(TOKENS, 4, 8, seed=1, step=7)
    sample_batch(TOKENS, 4, 8, seed=1, step=8)  # no hidden state: other calls change nothing
    np.testing.assert_array_equal(sample_batch(TOKENS, 4, 8, seed=1, step=7), a)
    assert not np.array_equal(sample_batch(TOKENS, 4, 8, seed=1, step=8), a)
    assert not np.array_equal(sample_batch(TOKENS, 4, 8, seed=2, step=7), a)


def test_sample_batch_reaches_both_ends():
    tokens = np.arange(6)
    starts = np.concatenate([sample_batch(tokens, 16, 4, 0, s)[:, 0] for s in range(10)])
    assert set(starts.tolist()) == {0, 1}  # 6 tokens hold exactly two windows of 5


def test_sample_batch_errors():
    with pytest.raises(DataError, match="has 5 tokens but a window needs seq_len \\+ 1 = 6"):
        sample_batch(np.arange(5), 2, 5, 0, 0)
    with pytest.raises(DataError, match="batch_size"):
        sample_batch(TOKENS, 0, 5, 0, 0)


def test_eval_windows_stride_and_cover():
    w = eval_windows(np.arange(101), seq_len=10, max_windows=100)
    assert w.shape == (10, 11) and w.dtype == np.int32
    np.testing.assert_array_equal(w[:, 0], np.arange(0, 100, 10))
    # Every target token is scored exactly once.
    np.testing.assert_array_equal(w[:, 1:].reshape(-1), np.arange(1, 101))


def test_eval_windows_evenly_spread_subset():
    w = eval_windows(np.arange(1001), seq_len=10, max_windows=4)  # 100 windows fit
    np.testing.assert_array_equal(w[:, 0], [0, 330, 660, 990])
    np.testing.assert_array_equal(eval_windows(np.arange(1001), 10, 1)[:, 0], [0])
    with pytest.raises(DataError, match="max_windows"):
        eval_windows(np.arange(100), 10, 0)


def test_unigram_hand_example():
    # Add-one counts over V=3: token 0 seen twice -> 3, token 1 once -> 2, token 2 never -> 1; total 6.
    # Validation [0, 2]: -(log2(3/6) + log2(1/6)) / 2 = (1 + log2 6) / 2.
    bits = unigram_bits_per_token(np.array([0, 0, 1]), np.array([0, 2]), vocab_size=3)
    assert bits == pytest.approx((1 + math.log2(6)) / 2, abs=1e-12)
    # A flat train distribution gives log2 V whatever the validation tokens are.
    assert unigram_bits_per_token(np.arange(256), np.array([5, 5, 9]), 256) == pytest.approx(8.0)


def test_unigram_errors():
    with pytest.raises(DataError, match=r"outside \[0, 3\)"):
        unigram_bits_per_token(np.array([0, 3]), np.array([0]), 3)
    with pytest.raises(DataError, match="valid_tokens is empty"):
        unigram_bits_per_token(np.array([0]), np.array([], dtype=np.int32), 3)
