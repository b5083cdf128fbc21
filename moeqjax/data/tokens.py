"""Token streams: a text corpus encoded by a tokenizer, checked against the model's vocabulary."""

import dataclasses

import numpy as np

from moeqjax.data.corpus import DOC_SEPARATOR, TextCorpus
from moeqjax.data.errors import DataError
from moeqjax.data.tokenizer import ByteTokenizer, Tokenizer

# Documents are encoded in groups of this many, so encode_batch parallelises without holding
# every Encoding object of a large corpus at once.
_ENCODE_CHUNK = 256


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: element-wise array comparison has no truth value.
class TokenCorpus:
    """The train and validation splits as flat token-id streams, ready for batching.

    Attributes:
      train: token ids, shape [T_train]; uint8 for the byte tokenizer (the corpus bytes
        themselves, no copy), int32 otherwise.
      valid: token ids, shape [T_valid], same dtype.
      fingerprint: the text corpus fingerprint plus `tokenizer` (its name or tokenizer.json path),
        `vocab_size` (the tokenizer's), and for non-byte tokenizers `train_tokens`/`valid_tokens`.
      unit: "byte" for the byte tokenizer, "token" otherwise: what bits/<unit> in reports count.
      vocab_size: the tokenizer's vocab size; every id is below it.
    """

    train: np.ndarray
    valid: np.ndarray
    fingerprint: dict
    unit: str
    vocab_size: int


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    """Errors if the tokenizer can produce ids the model has no embedding row for.

    A model vocab larger than the tokenizer's is fine (HF checkpoints often pad it).
    """
    if isinstance(tokenizer, ByteTokenizer):
        if model_vocab_size < 256:
            raise DataError(
                f"byte-level data needs model.vocab_size >= 256, the model has {model_vocab_size}; "
                "set --config.model.vocab_size=256 or pass --tokenizer DIR with a tokenizer.json "
                "that fits the model"
            )
        return
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(
            f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but the model's "
            f"vocab_size is {model_vocab_size}, so some ids have no embedding; use the checkpoint's "
            f"own tokenizer or set --config.model.vocab_size={tokenizer.vocab_size} (pretraining only)"
        )


def _encode_split(flat: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Encodes each DOC_SEPARATOR-delimited document and joins them with the separator id."""
    docs = [d.decode("utf-8", errors="replace") for d in flat.tobytes().split(DOC_SEPARATOR)]
    encode_batch = getattr(tokenizer, "encode_batch", None)
    parts = []
    for i in range(0, len(docs), _ENCODE_CHUNK):
        chunk = docs[i:i + _ENCODE_CHUNK]
        parts += encode_batch(chunk) if encode_batch else [tokenizer.encode(d) for d in chunk]
    sep = getattr(tokenizer, "separator_id", None)
    if sep is not None and len(parts) > 1:
        sep_arr = np.asarray([sep], dtype=np.int32)
        parts = [x for p in parts for x in (p, sep_arr)][:-1]
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def encode_corpus(corpus: TextCorpus, tokenizer: Tokenizer, model_vocab_size: int) -> TokenCorpus:
    """Tokenizes both splits of a text corpus for a model with `model_vocab_size` embeddings.

    The byte tokenizer keeps the corpus arrays as they are (ids = bytes, documents separated by
    NUL = id 0), so byte-level runs see exactly the tokens they always did. Any other tokenizer
    encodes each document separately (no special tokens added) and puts its separator_id (the
    end-of-text token) between documents, or nothing when it has none.

    Args:
      corpus: the text corpus.
      tokenizer: a Tokenizer; see make_tokenizer.
      model_vocab_size: the model's vocab size; ids must be below it.

    Returns:
      The token corpus.
    """
    check_vocab(tokenizer, model_vocab_size)
    fingerprint = dict(corpus.fingerprint, tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size)
    if isinstance(tokenizer, ByteTokenizer):
        return TokenCorpus(corpus.train, corpus.valid, fingerprint, "byte", tokenizer.vocab_size)
    train, valid = _encode_split(corpus.train, tokenizer), _encode_split(corpus.valid, tokenizer)
    for name, ids in (("train", train), ("validation", valid)):
        if ids.size < 2:
            raise DataError(f"the {name} split encodes to {ids.size} tokens with {tokenizer.name}; add more data")
        if int(ids.max()) >= model_vocab_size:  # vocab_size covers this; a malformed tokenizer might not
            raise DataError(
                f"tokenizer {tokenizer.name} produced id {int(ids.max())} >= the model's vocab_size "
                f"{model_vocab_size}; use the tokenizer the model was trained with"
            )
    fingerprint.update(train_tokens=int(train.size), valid_tokens=int(valid.size))
    for arr in (train, valid):
        arr.flags.writeable = False
    return TokenCorpus(train, valid, fingerprint, "token", tokenizer.vocab_size)
