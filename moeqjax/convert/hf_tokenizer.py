"""The tokenizer files an HF-layout export carries: the run's own, or our byte vocabulary as a byte-level tokenizer.json."""

from __future__ import annotations

import json
import pathlib

from moeqjax.convert.errors import ConvertError
from moeqjax.convert.gguf_vocab import byte_chars
from moeqjax.data.tokenizer import TOKENIZER_JSON
from moeqjax.data.tokenizer import tokenizer_files as run_tokenizer_files

# Without a tokenizer_config.json transformers picks the class from config.json's model_type (a
# sentencepiece Llama tokenizer for Mixtral), which is not what a tokenizer.json-only folder holds.
_FAST = "PreTrainedTokenizerFast"


def byte_tokenizer_json() -> dict:
  """Our UTF-8 byte tokenizer (id = byte value) as a Hugging Face tokenizer.json.

  Byte-level BPE with no merges and no regex split: every byte of the text becomes its GPT-2
  alphabet character, which is its own token, so the ids are the UTF-8 bytes, as in moeqjax.
  """
  chars = byte_chars()
  level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
           "use_regex": False}
  return {
      "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
      "normalizer": None, "pre_tokenizer": level, "post_processor": None, "decoder": level,
      "model": {"type": "BPE", "dropout": None, "unk_token": None,
                "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": False,
                "byte_fallback": False, "ignore_merges": False,
                "vocab": {c: i for i, c in enumerate(chars)}, "merges": []},
  }


def tokenizer_files(tokenizer: str | pathlib.Path | None, eos_id: int | None) -> dict[str, bytes]:
  """{file name: bytes} to put beside an HF-layout export's weights.

  Args:
    tokenizer: the run's tokenizer.json or its folder (its tokenizer_config.json and
      special_tokens_map.json come along when present), or None for the byte vocabulary.
    eos_id: the byte run's end-of-text id (its document separator), named as eos_token.
  """
  if tokenizer is None:
    config = {"tokenizer_class": _FAST}
    if eos_id is not None:
      config["eos_token"] = byte_chars()[eos_id]
    return {TOKENIZER_JSON: json.dumps(byte_tokenizer_json(), ensure_ascii=False).encode(),
            "tokenizer_config.json": json.dumps(config, indent=2).encode()}
  found = run_tokenizer_files(tokenizer)
  if not found[0].is_file():
    raise ConvertError(f"the run's tokenizer {found[0]} is not there; it cannot be exported with it")
  files = {TOKENIZER_JSON: found[0].read_bytes()}
  files.update((f.name, f.read_bytes()) for f in found[1:])
  if "tokenizer_config.json" in files:
    config = json.loads(files["tokenizer_config.json"])
    if "tokenizer_class" not in config:
      config["tokenizer_class"] = _FAST
      files["tokenizer_config.json"] = json.dumps(config, indent=2).encode()
  else:
    files["tokenizer_config.json"] = json.dumps({"tokenizer_class": _FAST}, indent=2).encode()
  return files
