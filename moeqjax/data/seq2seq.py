"""Sequence-to-sequence data: T5 span corruption of a token stream, and text->summary pairs from jsonl/parquet."""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from moeqjax.data import readers
from moeqjax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Seq2SeqBatch:
    """One batch for an encoder-decoder: every array is int32 [B, len] (mask: bool).

    encoder_ids: the source; decoder_ids: the target shifted right behind decoder_start_id;
    targets: the tokens the decoder predicts; target_mask: False on padding (no loss there);
    encoder_mask: False on the source's padding, which attention then skips (as transformers'
    attention_mask does); None means no padding.
    """

    encoder_ids: np.ndarray
    decoder_ids: np.ndarray
    targets: np.ndarray
    target_mask: np.ndarray
    encoder_mask: np.ndarray | None = None


def span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a length-token window, T5's rounding (at least one of each)."""
    num_noise = int(round(length * noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = int(round(num_noise / mean_span_length))
    return num_noise, min(max(num_spans, 1), num_noise, length - num_noise)


def span_lengths(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(encoder length, decoder length) of a corrupted window: fixed for a given window length."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    return length - num_noise + num_spans, num_noise + num_spans


def _random_segmentation(rng: np.random.Generator, num_items: int, num_segments: int) -> np.ndarray:
    """Lengths of num_segments non-empty segments that add up to num_items, uniformly at random."""
    cuts = np.sort(rng.choice(np.arange(1, num_items), size=num_segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [num_items]]))


def noise_mask(rng: np.random.Generator, length: int, noise_density: float,
               mean_span_length: float) -> np.ndarray:
    """bool [length]: T5's random spans; the window starts with kept tokens and alternates
    kept / noise spans, as many of each, with the span counts of span_counts."""
    num_noise, num_spans = span_counts(length, noise_density, mean_span_length)
    noise = _random_segmentation(rng, num_noise, num_spans)
    kept = _random_segmentation(rng, length - num_noise, num_spans)
    mask = np.zeros(length, bool)
    start = 0
    for k, n in zip(kept, noise):
        mask[start + k:start + k + n] = True
        start += k + n
    return mask


def corrupt_spans(tokens: np.ndarray, mask: np.ndarray, sentinel_ids) -> tuple[np.ndarray, np.ndarray]:
    """(encoder input, decoder target) of T5 span corruption.

    The input keeps the unmasked tokens and puts sentinel i where noise span i was; the target is
    sentinel i followed by noise span i, for every span in order.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    starts = mask & ~np.concatenate([[False], mask[:-1]])
    span_index = np.cumsum(starts) - 1
    if span_index.max(initial=-1) >= len(sentinel_ids):
        raise DataError(f"{span_index.max() + 1} noise spans need as many sentinel ids, got "
                        f"{len(sentinel_ids)}; lower the noise density or add sentinels")
    sentinels = np.asarray(sentinel_ids)
    enc = np.where(starts, sentinels[np.maximum(span_index, 0)], tokens)[~mask | starts]
    dec = []
    for i in np.flatnonzero(starts):
        dec.append(sentinels[span_index[i]])
        j = i
        while j < len(mask) and mask[j]:
            dec.append(tokens[j])
            j += 1
    return enc.astype(np.int32), np.asarray(dec, np.int32)


def t5_sentinel_ids(vocab_size: int, count: int, first: int = -1) -> list[int]:
    """T5's sentinels <extra_id_0>, <extra_id_1>, ...: `count` ids counting down from `first`
    (the id of <extra_id_0>; -1: the top id, vocab_size - 1). A T5 tokenizer puts them at the top
    of its own ids, which can sit below a padded model vocabulary (32099 in 32128 for T5/Switch)."""
    top = vocab_size - 1 if first < 0 else first
    if count < 1 or top >= vocab_size or count > top + 1 or count >= vocab_size:
        raise DataError(f"{count} sentinel ids from id {top} down do not fit a vocabulary of "
                        f"{vocab_size}")
    return [top - i for i in range(count)]


def _shift_right(targets_BxT: np.ndarray, decoder_start_id: int) -> np.ndarray:
    start = np.full((targets_BxT.shape[0], 1), decoder_start_id, np.int32)
    return np.concatenate([start, targets_BxT[:, :-1]], axis=1).astype(np.int32)


def span_corruption_batch(tokens: np.ndarray, batch_size: int, length: int, seed: int, step: int, *,
                          sentinel_ids, decoder_start_id: int, noise_density: float = 0.15,
                          mean_span_length: float = 3.0) -> Seq2SeqBatch:
    """Random windows of `length` tokens, span-corrupted; a pure function of (seed, step).

    Every window has the same span counts, so the encoder and decoder lengths are fixed
    (span_lengths) and nothing is padded.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or len(tokens) < length + 1:
        raise DataError(f"span corruption needs a 1-d token stream longer than its window of "
                        f"{length}; got shape {tokens.shape}")
    if length < 2:
        raise DataError(f"a span-corruption window needs at least 2 tokens, got {length}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - length + 1, size=batch_size)
    enc, dec = [], []
    for s in starts:
        window = tokens[s:s + length]
        e, d = corrupt_spans(window, noise_mask(rng, length, noise_density, mean_span_length),
                             sentinel_ids)
        enc.append(e)
        dec.append(d)
    targets = np.stack(dec)
    encoder = np.stack(enc)
    return Seq2SeqBatch(encoder, _shift_right(targets, decoder_start_id), targets,
                        np.ones(targets.shape, bool), np.ones(encoder.shape, bool))


def read_pairs(path: str | pathlib.Path, source_field: str = "text",
               target_field: str = "summary",
               settings: tuple[str, str] | None = None) -> list[tuple[bytes, bytes]]:
    """(source, target) UTF-8 pairs from the records of a .jsonl, .parquet, .arrow or .feather file.

    A record without either field is a one-line DataError that names the file, the record and the
    setting to change (data.source_field / data.target_field, or `settings`: the caller's names
    of the two settings).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise DataError(f"seq2seq data {path} is not a file; pass a .jsonl or .parquet file of "
                        f"records with {source_field!r} and {target_field!r} fields")
    if path.suffix == ".jsonl":
        read = readers.read_jsonl
        flags = ("data.source_field", "data.target_field")
    elif path.suffix in readers.ARROW_SUFFIXES:
        read = readers.read_arrow_table
        flags = ("--config.data.source_field", "--config.data.target_field")
    else:
        raise DataError(f"seq2seq data {path} must be .jsonl, .parquet, .arrow or .feather "
                        f"(records with {source_field!r} and {target_field!r} fields)")
    flags = settings or flags
    sources = read(path, source_field, flags[0])
    targets = read(path, target_field, flags[1])
    return [(s, t) for (_, s), (_, t) in zip(sources, targets)]


def pair_batch(pairs, batch_size: int, source_len: int, target_len: int, seed: int, step: int, *,
               encode, pad_id: int, decoder_start_id: int, eos_id: int | None = None) -> Seq2SeqBatch:
    """A random batch of (source, target) pairs, tokenized by `encode`, cut and padded to fixed
    lengths (targets end with eos_id when given); a pure function of (seed, step)."""
    if not pairs:
        raise DataError("no (source, target) pairs to batch")
    rng = np.random.default_rng([seed, step])
    picks = rng.integers(0, len(pairs), size=batch_size)
    enc = np.full((batch_size, source_len), pad_id, np.int32)
    enc_mask = np.zeros((batch_size, source_len), bool)
    targets = np.full((batch_size, target_len), pad_id, np.int32)
    mask = np.zeros((batch_size, target_len), bool)
    for row, i in enumerate(picks):
        src = list(encode(pairs[i][0]))[:source_len]
        tgt = list(encode(pairs[i][1]))
        tgt = (tgt[:target_len - 1] + [eos_id]) if eos_id is not None else tgt[:target_len]
        enc[row, :len(src)] = src
        enc_mask[row, :len(src)] = True
        targets[row, :len(tgt)] = tgt
        mask[row, :len(tgt)] = True
    return Seq2SeqBatch(enc, _shift_right(targets, decoder_start_id), targets, mask, enc_mask)
