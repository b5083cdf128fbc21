"""`moeqjax import-hf` of a switch_transformers checkpoint: its base config and its span-corruption sentinels."""

# The family is decided from the checkpoint's config.json (model_type), never from a name inside
# the model; the rest of the import (params streamed, tokenizer copied, hf_config.json kept) is
# import_hf's, shared with the decoder-only models.

from __future__ import annotations

import pathlib

from moeqjax.convert import ConvertError
from moeqjax.convert.switch_hf_config import is_switch as is_switch_hf_config
from moeqjax.data import make_tokenizer

# The base of an imported Switch config's other sections (seq2seq, qat, loss, eval, ...) when
# import-hf is given no --config: the decoder-only default (configs/tiny.py) has none of them.
SWITCH_BASE = pathlib.Path(__file__).resolve().parents[2] / "configs" / "switch_tiny.py"
SEQ2SEQ_FIELDS = ("num_sentinels", "first_sentinel_id")  # what the import decides in `seq2seq`
SENTINEL = "<extra_id_{}>"


def is_switch_checkpoint(config_json: dict) -> bool:
  return is_switch_hf_config(config_json)


def default_base(config_json: dict) -> str | None:
  """The base config path import-hf uses without --config: None (the loader's default, the
  decoder-only configs/tiny.py), or configs/switch_tiny.py for a Switch checkpoint."""
  if not is_switch_checkpoint(config_json):
    return None
  if not SWITCH_BASE.is_file():
    raise ConvertError(f"the Switch base config {SWITCH_BASE} is not there (moeqjax was installed "
                       "without its repo); pass --config with a Switch config")
  return str(SWITCH_BASE)


def sentinel_fields(tokenizer_dir: str, vocab_size: int, wanted: int) -> dict:
  """seq2seq.num_sentinels / first_sentinel_id that fit the checkpoint's vocabulary.

  A tokenizer with T5's sentinels (<extra_id_0> at its top id, <extra_id_1> one below, ...) gives
  them as they are: a T5 model's vocabulary is padded above them (32128 rows for 32100 ids), so
  the model's top id is not <extra_id_0>. Otherwise (bytes, or a tokenizer without them) the
  sentinels are the model's top ids above the tokenizer's, at most `wanted` of them.

  Raises:
    ConvertError: sentinels that are not consecutive, or no id left above the tokenizer's.
  """
  tokenizer = make_tokenizer(tokenizer_dir)
  find = getattr(tokenizer, "token_id", lambda token: None)
  first = find(SENTINEL.format(0))
  if first is not None:
    ids = []
    while (i := find(SENTINEL.format(len(ids)))) is not None:
      ids.append(i)
    if ids != list(range(first, first - len(ids), -1)) or first >= vocab_size:
      raise ConvertError(f"the tokenizer's <extra_id_N> sentinels are not consecutive ids counting "
                         f"down from <extra_id_0>={first} below the model's {vocab_size}; set "
                         "--config.seq2seq.first_sentinel_id and num_sentinels by hand")
    return {"num_sentinels": len(ids), "first_sentinel_id": first}
  room = vocab_size - tokenizer.vocab_size
  if room < 1:
    raise ConvertError(f"the model's {vocab_size} ids leave none above the tokenizer's "
                       f"{tokenizer.vocab_size} for span-corruption sentinels, and the tokenizer "
                       "has no <extra_id_0>; import with a tokenizer.json that has T5's sentinels")
  return {"num_sentinels": min(int(wanted), room), "first_sentinel_id": -1}
