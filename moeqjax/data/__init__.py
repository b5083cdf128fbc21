"""Data: the embedded corpus, local text/jsonl readers, tokenizers and batching."""

from moeqjax.data.batching import eval_windows, sample_batch, unigram_bits_per_token
from moeqjax.data.corpus import (
    DOC_SEPARATOR,
    TextCorpus,
    load_corpus,
    load_stdlib_corpus,
    split_paths,
    stdlib_files,
    stdlib_root,
)
from moeqjax.data.errors import DataError
from moeqjax.data.tokenizer import ByteTokenizer, Tokenizer, make_tokenizer

__all__ = [
    "DOC_SEPARATOR",
    "ByteTokenizer",
    "DataError",
    "TextCorpus",
    "Tokenizer",
    "eval_windows",
    "load_corpus",
    "load_stdlib_corpus",
    "make_tokenizer",
    "sample_batch",
    "split_paths",
    "stdlib_files",
    "stdlib_root",
    "unigram_bits_per_token",
]
