"""The GGUF vocabulary: our 256-token byte vocabulary, or a Hugging Face BPE tokenizer.json."""

from __future__ import annotations

import dataclasses
import json
import pathlib

from moeqjax.convert.errors import ConvertError

# gguf.TokenType values, kept here so that this module imports without the gguf package.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


@dataclasses.dataclass(frozen=True)
class Vocab:
  """What llama.cpp's vocabulary loader reads (src/llama-vocab.cpp).

  model: tokenizer.ggml.model ("gpt2": byte-level BPE).
  tokens, types: one entry per id, vocab_size long.
  merges: BPE merges "a b" (gpt2 only).
  eos_id: the end-of-text id, or None.
  source: "bytes" or the tokenizer.json path (for the report).
  pre: tokenizer.ggml.pre, llama.cpp's pre-tokenizer (gpt2 only).
  note: what the report should say about it ("" when nothing).
  """

  model: str
  tokens: list
  types: list
  merges: list
  eos_id: int | None
  source: str
  pre: str = ""
  note: str = ""


def byte_chars() -> list:
  """GPT-2's byte-level alphabet: the printable character that stands for each byte value."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
               + list(range(ord("\xae"), ord("\xff") + 1)))
  chars, extra = {}, 0
  for b in range(256):
    if b in printable:
      chars[b] = chr(b)
    else:  # control bytes, space and a few others map past 255, in byte order
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def byte_vocab(vocab_size: int) -> Vocab:
  """Our UTF-8 byte tokenizer (id = byte value) as a llama.cpp vocabulary.

  Written as byte-level BPE ("gpt2") with no merges: llama.cpp maps every byte of the text to its
  GPT-2 alphabet character, and with no merge to apply each one is its own token, so text becomes
  exactly its UTF-8 bytes and the ids are the byte values, as in our tokenizer. (SentencePiece byte
  tokens would not do: llama.cpp's SPM path rewrites spaces to U+2581 first.) Ids past 255 (a
  padded vocab) are UNUSED.
  """
  if vocab_size < 256:
    raise ConvertError(f"model.vocab_size={vocab_size} is below 256: the byte vocabulary needs "
                       "one token per byte value")
  chars = byte_chars()
  tokens = chars + [f"<unused{i}>" for i in range(vocab_size - 256)]
  types = [NORMAL] * 256 + [UNUSED] * (vocab_size - 256)
  # llama.cpp requires a merges array and gguf cannot write an empty one. This merge joins two
  # two-character symbols, which never exist (text starts as single characters and no other merge
  # makes longer ones), so it never applies.
  inert = f"{chars[0] * 2} {chars[0] * 2}"
  return Vocab("gpt2", tokens, types, [inert], None, "bytes", "gpt-2")


def bpe_vocab(path, vocab_size: int) -> Vocab:
  """A Hugging Face byte-level BPE `tokenizer.json` (a file or its folder) as a llama.cpp "gpt2" vocab.

  Raises:
    ConvertError: no such file, not a BPE model, or more tokens than model.vocab_size.
  """
  path = pathlib.Path(path)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.is_file():
    raise ConvertError(f"--tokenizer {path}: no tokenizer.json there")
  spec = json.loads(file.read_text())
  model = spec.get("model") or {}
  if model.get("type") != "BPE":
    raise ConvertError(f"{file} is a {model.get('type')!r} tokenizer; GGUF export writes byte-level "
                       "BPE (gpt2) vocabularies only")
  by_id = {int(i): (tok, NORMAL) for tok, i in model["vocab"].items()}
  for added in spec.get("added_tokens") or []:
    by_id[int(added["id"])] = (added["content"], CONTROL if added.get("special") else USER_DEFINED)
  top = max(by_id) + 1
  if top > vocab_size:
    raise ConvertError(f"{file} has ids up to {top - 1}, beyond model.vocab_size={vocab_size}")
  tokens, types = [], []
  for i in range(vocab_size):
    tok, typ = by_id.get(i, (f"[PAD{i}]", UNUSED))
    tokens.append(tok)
    types.append(typ)
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
  pre, note = _pre_tokenizer(spec.get("pre_tokenizer") or {})
  return Vocab("gpt2", tokens, types, merges, _eos_id(file.parent, model["vocab"], spec),
               str(file), pre, note)


def _pre_tokenizer(pre: dict):
  """(tokenizer.ggml.pre, note): GPT-2's byte-level split maps to llama.cpp's "gpt-2"."""
  if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
    return "gpt-2", ""
  return "default", (f"pre-tokenizer {pre.get('type')!r} has no llama.cpp name here: written as "
                     "'default', so llama.cpp may split text differently (token-id prompts are "
                     "unaffected)")


def _eos_id(folder: pathlib.Path, vocab: dict, spec: dict):
  """tokenizer_config.json's eos_token next to tokenizer.json, as an id (None if absent)."""
  cfg_file = folder / "tokenizer_config.json"
  if not cfg_file.is_file():
    return None
  eos = json.loads(cfg_file.read_text()).get("eos_token")
  if isinstance(eos, dict):
    eos = eos.get("content")
  ids = {a["content"]: int(a["id"]) for a in spec.get("added_tokens") or []}
  ids.update({k: int(v) for k, v in vocab.items()})
  return ids.get(eos)


def add_vocab(writer, vocab: Vocab):
  """Writes the tokenizer.ggml.* keys. No BOS/EOS is added to prompts: our models train without."""
  writer.add_tokenizer_model(vocab.model)
  writer.add_tokenizer_pre(vocab.pre)
  writer.add_token_list(vocab.tokens)
  writer.add_token_types(vocab.types)
  writer.add_token_merges(vocab.merges)
  if vocab.eos_id is not None:
    writer.add_eos_token_id(vocab.eos_id)
  writer.add_add_bos_token(False)
  writer.add_add_eos_token(False)
