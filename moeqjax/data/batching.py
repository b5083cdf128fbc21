"""Token windows for training and evaluation, and the unigram baseline they are compared with."""

import numpy as np

from moeqjax.data.errors import DataError

# Dims: B = batch size, L = sequence length (seq_len), N = number of eval windows, V = vocab size.
# Each window has L + 1 tokens so that inputs are window[:, :-1] and targets window[:, 1:].


def _check_tokens(tokens: np.ndarray, seq_len: int, what: str) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise DataError(f"{what} must be a 1-D token array, got shape {tokens.shape}; flatten it first")
    if seq_len < 1:
        raise DataError(f"seq_len must be at least 1, got {seq_len}")
    if tokens.size < seq_len + 1:
        raise DataError(
            f"{what} has {tokens.size} tokens but a window needs seq_len + 1 = {seq_len + 1}; "
            "use a shorter seq_len or more data"
        )
    return tokens


def sample_batch(tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, step: int,
                 process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """Samples random windows, a pure function of (seed, step).

    The generator is seeded with [seed, step] alone, not carried between calls, so a run resumed
    at step s sees exactly the batches an uninterrupted run would have seen.

    Multi-host (batch sharding): with process_count P > 1 every host draws the same global batch
    and keeps its rows [i * B / P, (i + 1) * B / P), so the hosts' rows are disjoint, together
    the global batch, and the global batch does not depend on P. This needs the whole token
    stream on every host; the alternative is document sharding in load_corpus (each host holds
    its own documents, then calls this with P = 1 and its local batch size). Use one, not both.

    Args:
      tokens: integer token ids, shape [T], T >= seq_len + 1.
      batch_size: B, windows per batch.
      seq_len: L, model sequence length.
      seed: non-negative data seed.
      step: non-negative training step.
      process_index: this host, in [0, P).
      process_count: P, the number of hosts; must divide batch_size.

    Returns:
      int32 array, shape [B / P, L + 1]; row b is tokens[s_b : s_b + L + 1] for a uniform start s_b.
    """
    tokens = _check_tokens(tokens, seq_len, "the token array")
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if seed < 0 or step < 0:
        raise DataError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise DataError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if batch_size % process_count:
        raise DataError(
            f"batch_size {batch_size} is not divisible by process_count {process_count}; "
            "use a global batch size that is a multiple of the number of hosts"
        )
    rng = np.random.default_rng([seed, step])
    # High is exclusive: the last valid start is T - (L + 1).
    starts_B = rng.integers(0, tokens.size - seq_len, size=batch_size)
    local = batch_size // process_count
    starts_B = starts_B[process_index * local:(process_index + 1) * local]
    return tokens[starts_B[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Fixed evaluation windows with stride L, so every target token is scored at most once.

    Consecutive windows share one token (the last target of one is the first input of the next).
    When more than max_windows fit, a deterministic evenly spaced subset is kept, always including
    the first and the last window, so the estimate covers the whole array rather than its start.

    Args:
      tokens: integer token ids, shape [T], T >= seq_len + 1.
      seq_len: L, model sequence length.
      max_windows: upper bound on N.

    Returns:
      int32 array, shape [N, L + 1], N = min(max_windows, (T - 1) // L).
    """
    tokens = _check_tokens(tokens, seq_len, "the token array")
    if max_windows < 1:
        raise DataError(f"max_windows must be at least 1, got {max_windows}")
    count = (tokens.size - 1) // seq_len
    if count <= max_windows:
        index_N = np.arange(count)
    elif max_windows == 1:
        index_N = np.zeros(1, dtype=np.int64)
    else:
        # Integer floor of an even spacing with step > 1: indices are distinct and exact on every machine.
        index_N = np.arange(max_windows) * (count - 1) // (max_windows - 1)
    starts_N = index_N * seq_len
    return tokens[starts_N[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def unigram_bits_per_token(train_tokens: np.ndarray, valid_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of validation tokens under the add-one smoothed train unigram distribution.

    This is the "unigram byte model" baseline: a model that learns nothing about context should
    reach it, and a useful one must beat it. On the stdlib corpus (valid_fraction=0.05) it is
    4.63 bits per byte.

    Args:
      train_tokens: integer ids in [0, V), shape [T_train].
      valid_tokens: integer ids in [0, V), shape [T_valid], T_valid >= 1.
      vocab_size: V.

    Returns:
      Mean -log2 p(token) over the validation tokens, in bits per token.
    """
    train_tokens = np.asarray(train_tokens).reshape(-1)
    valid_tokens = np.asarray(valid_tokens).reshape(-1)
    if valid_tokens.size == 0:
        raise DataError("valid_tokens is empty; pass at least one validation token")
    for what, ids in (("train_tokens", train_tokens), ("valid_tokens", valid_tokens)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise DataError(
                f"{what} has ids outside [0, {vocab_size}) (min {int(ids.min())}, max {int(ids.max())}); "
                "pass the tokenizer's vocab_size"
            )
    counts_V = np.bincount(train_tokens.astype(np.int64), minlength=vocab_size).astype(np.float64) + 1.0
    log2p_V = np.log2(counts_V) - np.log2(counts_V.sum())
    return float(-log2p_V[valid_tokens.astype(np.int64)].mean())
