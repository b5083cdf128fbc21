"""Data: the embedded corpus, local text/jsonl/parquet/arrow readers, tokenizers and batching."""

from moeqjax.data.batching import eval_windows, sample_batch, unigram_bits_per_token
from moeqjax.data.corpus import (
    DOC_SEPARATOR,
    TextCorpus,
    load_corpus,
    load_stdlib_corpus,
    shard_bytes,
    split_paths,
    stdlib_files,
    stdlib_root,
)
from moeqjax.data.errors import DataError
from moeqjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, make_tokenizer
from moeqjax.data.tokens import TokenCorpus, check_vocab, encode_corpus

__all__ = [
    "DOC_SEPARATOR",
    "ByteTokenizer",
    "DataError",
    "HFTokenizer",
    "TextCorpus",
    "TokenCorpus",
    "Tokenizer",
    "check_vocab",
    "encode_corpus",
    "eval_windows",
    "load_corpus",
    "load_stdlib_corpus",
    "make_tokenizer",
    "sample_batch",
    "shard_bytes",
    "split_paths",
    "stdlib_files",
    "stdlib_root",
    "unigram_bits_per_token",
]
