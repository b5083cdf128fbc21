"""Tokenizers: the `Tokenizer` protocol, the default byte-level one and a local HF `tokenizer.json` one."""

import json
import pathlib
import shutil
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from moeqjax.data.errors import DataError


@runtime_checkable
class Tokenizer(Protocol):
    """What the library needs from a tokenizer (ByteTokenizer and HFTokenizer satisfy it)."""

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


# Special tokens that end a document, tried in order when tokenizer_config.json names no eos_token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>", "[SEP]")
DATA_EXTRA_HINT = "install the optional extra: pip install 'moeqjax[data]' (or pip install tokenizers pyarrow)"


def _eos_token(folder: pathlib.Path) -> str | None:
    """The eos_token named by a tokenizer_config.json next to tokenizer.json, if any."""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(eos, dict):  # older transformers write {"content": "</s>", ...}
        eos = eos.get("content")
    return eos if isinstance(eos, str) and eos else None


class HFTokenizer:
    """A local Hugging Face `tokenizer.json`, run with the `tokenizers` library (no downloads).

    Attributes:
      name: the resolved path of tokenizer.json (recorded in the data fingerprint).
      vocab_size: number of ids including added (special) tokens; every id is below it.
      separator_id: the id put between documents: tokenizer_config.json's eos_token, else the
        first of _EOS_CANDIDATES in the vocabulary, else None (documents are joined directly).
    """

    def __init__(self, path: str | pathlib.Path):
        try:
            import tokenizers  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise DataError(f"--tokenizer {path} needs the `tokenizers` library; {DATA_EXTRA_HINT}") from e
        path = pathlib.Path(path).expanduser()
        if not path.exists():
            raise DataError(
                f"unknown tokenizer {str(path)!r}: no such file or folder; pass a folder holding a Hugging "
                "Face tokenizer.json (nothing is downloaded), or use 'bytes' (or '') for UTF-8 bytes"
            )
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(
                f"no tokenizer file at {file}; pass a folder holding tokenizer.json (a Hugging Face "
                "checkpoint folder) or the tokenizer.json file itself, or '' for bytes"
            )
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception for malformed files
            raise DataError(f"cannot read {file} as a Hugging Face tokenizer.json: {e}") from e
        self.name = str(file.resolve())
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        candidates = [t for t in (_eos_token(file.parent),) if t] + list(_EOS_CANDIDATES)
        ids = [self._tok.token_to_id(t) for t in candidates]
        self.separator_id = next((int(i) for i in ids if i is not None), None)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of text, no special tokens added; int32, shape [T]."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """encode() of each text, run in parallel by the Rust library; int32 arrays, shapes [T_i]."""
        out = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in out]

    def token_id(self, token: str) -> int | None:
        """The id of one token of the vocabulary (e.g. a T5 sentinel `<extra_id_0>`), or None."""
        i = self._tok.token_to_id(token)
        return None if i is None else int(i)

    def decode(self, ids) -> str:
        """Text of token ids (any array-like of shape [T]); special tokens are kept."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise DataError(f"token id {int(bad)} is outside this tokenizer's range [0, {self.vocab_size})")
        return self._tok.decode(ids.astype(np.int64).tolist(), skip_special_tokens=False)


TOKENIZER_JSON = "tokenizer.json"
# Files that travel with a tokenizer.json: its eos_token and special tokens (runs, packs, exports).
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """A tokenizer's files: its tokenizer.json (`path` is the file or its folder), then the
    TOKENIZER_COMPANIONS that exist beside it."""
    path = pathlib.Path(path)
    file = path / TOKENIZER_JSON if path.is_dir() else path
    return [file] + [file.parent / n for n in TOKENIZER_COMPANIONS if (file.parent / n).is_file()]


def copy_tokenizer(path: str | pathlib.Path, folder: pathlib.Path) -> None:
    """Copies a tokenizer's files (tokenizer_files) into `folder` (created), tokenizer.json by that name."""
    folder.mkdir(parents=True, exist_ok=True)
    files = tokenizer_files(path)
    shutil.copyfile(files[0], folder / TOKENIZER_JSON)
    for extra in files[1:]:
        shutil.copyfile(extra, folder / extra.name)


def make_tokenizer(name: str) -> Tokenizer:
    """Builds a tokenizer from its config value (`data.tokenizer`).

    Args:
      name: "" or "bytes" for UTF-8 bytes (ids 0..255); otherwise a path to a folder holding a
        Hugging Face tokenizer.json, or to the file itself (needs the `data` extra).

    Returns:
      The tokenizer.
    """
    if name in ("", "bytes"):
        return ByteTokenizer()
    return HFTokenizer(name)
