"""Tokenizers: the `Tokenizer` protocol and the byte-level tokenizer used by default."""

from typing import Protocol, runtime_checkable

import numpy as np

from moeqjax.data.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    """What the library needs from a tokenizer (a HF `tokenizers` one can satisfy it later)."""

    name: str
    vocab_size: int

    def encode(self, text: str) -> np.ndarray:
        """Returns int32 token ids, shape [T]."""
        ...

    def decode(self, ids) -> str:
        """Returns the text for token ids of shape [T]."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, so any text round-trips and nothing needs training."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> np.ndarray:
        """Encodes text as its UTF-8 bytes.

        Args:
          text: any string.

        Returns:
          int32 array, shape [T] with T = len(text.encode("utf-8")).
        """
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        """Decodes byte ids to text; invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD.

        Args:
          ids: integer ids, any array-like of shape [T] (numpy, jax or a list).

        Returns:
          The decoded string.
        """
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise DataError(
                f"token id {int(bad)} is outside the byte range [0, 256); "
                "decode only ids produced by a model with vocab_size=256"
            )
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def make_tokenizer(name: str) -> Tokenizer:
    """Builds a tokenizer from its config name.

    Args:
      name: tokenizer name; only "bytes" exists now.

    Returns:
      The tokenizer.
    """
    if name == "bytes":
        return ByteTokenizer()
    raise DataError(f"unknown tokenizer {name!r}; use 'bytes'")
