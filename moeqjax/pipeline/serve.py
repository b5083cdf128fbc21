"""`moeqjax pack` and `moeqjax generate` as pipeline phases: workdirs in, packed folders and text out."""

# Both model families (config_io.is_switch) go through the same phases; the family is decided here
# from the run's recorded model section or the packed manifest (serve.checkpoint.build_model), never
# inside the model. A Switch Transformer (encoder-decoder) generates greedily from its encoder
# input (switch_generate_text): `<extra_id_N>` in the prompt is the span-corruption sentinel
# vocab_size - 1 - N (data.t5_sentinel_ids), and generated ids above the tokenizer's vocabulary
# (the sentinels) are shown as `<extra_id_N>`.

from __future__ import annotations

import codecs
import dataclasses
import json
import pathlib
import re
import sys
import time

import ml_collections

from moeqjax.data import DOC_SEPARATOR, check_vocab, make_tokenizer
from moeqjax.model import SwitchConfig
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline import runs
from moeqjax.pipeline.evaluate import UnfinishedRun
from moeqjax.pipeline.workdirs import CONFIG_RECORD, finished_state, state_template
from moeqjax.serve import SamplingConfig, generate, load_packed, pack, switch_generate
from moeqjax.serve.checkpoint import build_model
from moeqjax.serve.decode import check_request


class NotARun(config_io.ConfigError):
  """A folder that is not the kind of run a command needs."""


def _record(workdir: pathlib.Path) -> dict:
  path = workdir / CONFIG_RECORD
  if not path.is_file():
    raise NotARun(f"{workdir} is not a moeqjax run (no {CONFIG_RECORD}); pass a finished "
                  "`moeqjax qat` or `moeqjax pretrain` workdir")
  return json.loads(path.read_text())


def end_of_text_id(tokenizer, switch: bool = False) -> int | None:
  """The id that ends a document: the byte separator, or the tokenizer's end-of-text id.

  A Switch model (`switch`) on bytes has none: its span-corruption targets never end with one
  (and byte 0 is its decoder start), so its generation runs --max-new-tokens; with a tokenizer it
  is the tokenizer's end-of-text id, which seq2seq.pairs targets end with.
  """
  if tokenizer.name == "bytes":
    return None if switch else DOC_SEPARATOR[0]
  return getattr(tokenizer, "separator_id", None)


def finished_student(workdir: pathlib.Path):
  """(config, state) of a finished `moeqjax qat` workdir, or a one-line error."""
  record = _record(workdir)
  if "qat" not in record:
    raise NotARun(f"{workdir} is not a `moeqjax qat` run (its {CONFIG_RECORD} has no qat "
                  "section); pack a QAT student")
  config = ml_collections.ConfigDict({k: record[k] for k in ("model", "quant", "data", "qat")})
  state = finished_state(workdir, state_template(config, "qat", record.get("expert_codes")),
                         config.qat.steps,
                         parts=("params", "quant"))
  if state is None:
    raise UnfinishedRun(f"{workdir} holds no finished QAT run of {config.qat.steps} steps; finish "
                        f"it with `moeqjax qat --workdir {workdir} --resume ...` before packing")
  return config, state


def pack_workdir(workdir, out, *, fp_dtype: str = "float32", overwrite: bool = False) -> dict:
  """Packs the student of a finished QAT workdir into `out`; returns the manifest."""
  workdir = pathlib.Path(workdir)
  config, state = finished_student(workdir)
  tokenizer_name = runs.run_tokenizer(workdir)
  tokenizer = make_tokenizer(tokenizer_name)
  return pack(config_io.any_model_config(config), state.params, state.quant, out,
              fp_dtype=fp_dtype, tokenizer=tokenizer_name or None,
              eos_id=end_of_text_id(tokenizer, config_io.is_switch(config)),
              overwrite=overwrite, source=str(workdir.absolute()))


def _generation_tokenizer(folder, recorded, given: str | None, vocab_size: int):
  """The tokenizer to generate with: the model's own; `given` (--tokenizer) must be the same one,
  and replaces it only where the recorded one has moved away (`recorded` is then None)."""
  if given is None:
    if recorded is None:
      recorded = runs.run_tokenizer(folder)  # raises: it says the tokenizer has moved
    return make_tokenizer(recorded)
  if recorded is not None:
    runs.check_same_tokenizer(given, recorded, "--tokenizer", f"{folder}")
  tokenizer = make_tokenizer(given)
  check_vocab(tokenizer, vocab_size)
  return tokenizer


def model_for_generation(packed: str | None, workdir: str | None, tokenizer: str | None = None):
  """(model, variables, tokenizer, eos_id, label) from a packed folder or a run's workdir.

  The tokenizer is the one the model was made with (the packed folder's, or the run's own copy or
  recorded path); `tokenizer` (generate's --tokenizer) must be that same one.
  """
  if packed:
    served = load_packed(packed)
    tok = _generation_tokenizer(packed, served.tokenizer_path, tokenizer,
                                served.model.cfg.vocab_size)
    eos_id = served.manifest["eos_id"]
    return served.model, served.variables, tok, eos_id, "packed"
  workdir = pathlib.Path(workdir)
  if import_hf.is_imported(workdir):
    config = config_io.load_config(workdir / import_hf.CONFIG_PY)
    params = import_hf.load_imported_params(workdir, config_io.model_config(config))
    variables, label = {"params": params}, "imported full precision"
  elif "qat" in _record(workdir):
    config, state = finished_student(workdir)
    variables, label = {"params": state.params, "quant": state.quant}, "fake-quant student"
  else:
    config = ml_collections.ConfigDict(_record(workdir))
    with config.unlocked():  # a pretrain run records no quant section; its model needs none
      config.quant = config_io.load_config(None).quant
    state = finished_state(workdir, state_template(config, "pretrain"), config.pretrain.steps,
                           parts=("params",))
    if state is None:
      raise UnfinishedRun(f"{workdir} holds no finished pretraining run; finish it with "
                          f"`moeqjax pretrain --workdir {workdir} --resume`")
    variables, label = {"params": state.params}, "full precision"
  cfg = config_io.any_model_config(config)
  try:
    recorded = runs.run_tokenizer(workdir)
    if import_hf.is_imported(workdir) and not recorded:
      recorded = None  # the checkpoint came without a tokenizer.json: --tokenizer may name it
  except runs.RunMismatch:
    if tokenizer is None:
      raise
    recorded = None  # moved away: --tokenizer stands in for it
  tok = _generation_tokenizer(workdir, recorded, tokenizer, cfg.vocab_size)
  model = build_model(cfg)
  return model, variables, tok, end_of_text_id(tok, is_switch_model(model)), label


class _Streamer:
  """Writes generated text as it arrives (bytes through an incremental UTF-8 decoder)."""

  def __init__(self, tokenizer, eos_id, out):
    self.tokenizer, self.eos_id, self.out, self.ids, self.shown = tokenizer, eos_id, out, [], ""
    self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

  def __call__(self, ids_B):
    token = int(ids_B[0])
    if token == self.eos_id:
      return
    if self.tokenizer.name == "bytes":
      self.out.write(self._utf8.decode(bytes([token])))
    else:
      self.ids.append(token)
      text = self.tokenizer.decode(self.ids)
      self.out.write(text[len(self.shown):])
      self.shown = text
    self.out.flush()


class BadRequest(config_io.ConfigError):
  """A generation request the model cannot serve (e.g. a prompt longer than its context)."""


def sampling_from_flags(temperature: float, top_k: int, top_p: float) -> SamplingConfig:
  """The SamplingConfig of `moeqjax generate`'s flags; a bad value is named by its flag."""
  try:
    return SamplingConfig(temperature, top_k, top_p)
  except ValueError as e:
    raise BadRequest(str(e).replace("temperature=", "--temperature ").replace(
        "top_k=", "--top-k ").replace("top_p=", "--top-p ")) from None


def generate_text(model, variables, tokenizer, eos_id, prompt: str, max_new_tokens: int,
                  sampling: SamplingConfig, seed: int, stream=None):
  """Streams the continuation of `prompt` to `stream` (default stdout); returns the Generation."""
  stream = sys.stdout if stream is None else stream
  ids = tokenizer.encode(prompt)[None, :]
  try:
    check_request(ids.shape[1], max_new_tokens, model.cfg.max_seq_len)
  except ValueError as e:
    raise BadRequest(str(e)) from None
  stream.write(prompt)
  stream.flush()
  # Never draw ids the tokenizer cannot decode (the model's vocabulary may be larger).
  sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.vocab_size)
  gen = generate(model, variables, ids, max_new_tokens, sampling=sampling, seed=seed,
                 eos_id=eos_id, on_tokens=_Streamer(tokenizer, eos_id, stream))
  stream.write("\n")
  return gen


# ---- Switch Transformer (encoder-decoder): the prompt is the encoder input

SENTINEL_TEXT = re.compile(r"<extra_id_(\d+)>")


def is_switch_model(model) -> bool:
  """Whether a model of model_for_generation is a Switch Transformer (encoder-decoder)."""
  return isinstance(model.cfg, SwitchConfig)


@dataclasses.dataclass
class SwitchGeneration:
  """A Switch generation: the generated ids (up to and without an end-of-text id), their text."""

  tokens: list[int]
  text: str
  encoder_tokens: int
  seconds: float


def encode_switch_prompt(tokenizer, vocab_size: int, prompt: str) -> list[int]:
  """The encoder ids of `prompt`: its text through the tokenizer, and each `<extra_id_N>` as the
  tokenizer's own token of that name (a T5 tokenizer's, e.g. of an imported Switch checkpoint)
  or else the sentinel id vocab_size - 1 - N (data.t5_sentinel_ids), above the tokenizer's ids."""
  ids, pos = [], 0
  own = getattr(tokenizer, "token_id", lambda token: None)
  for m in SENTINEL_TEXT.finditer(prompt):
    ids += [int(t) for t in tokenizer.encode(prompt[pos:m.start()])]
    if own(m.group(0)) is not None:
      ids.append(own(m.group(0)))
      pos = m.end()
      continue
    sentinel = vocab_size - 1 - int(m.group(1))
    if sentinel < tokenizer.vocab_size:
      raise BadRequest(f"{m.group(0)} in the prompt would be id {sentinel}, which is not above "
                       f"the tokenizer's {tokenizer.vocab_size} ids (model vocabulary "
                       f"{vocab_size}); use <extra_id_0> .. "
                       f"<extra_id_{vocab_size - 1 - tokenizer.vocab_size}>")
    ids.append(sentinel)
    pos = m.end()
  ids += [int(t) for t in tokenizer.encode(prompt[pos:])]
  return ids


def has_own_sentinels(tokenizer) -> bool:
  """Whether the tokenizer holds T5's sentinels itself (`<extra_id_0>` is one of its tokens)."""
  return getattr(tokenizer, "token_id", lambda token: None)("<extra_id_0>") is not None


def switch_text(tokenizer, vocab_size: int, ids) -> str:
  """Text of generated ids: runs of the tokenizer's ids decoded (bytes: invalid UTF-8 becomes
  U+FFFD); an id above them is a sentinel `<extra_id_N>`, N = vocab_size - 1 - id, when the
  sentinels sit above the tokenizer (data.t5_sentinel_ids), and otherwise an embedding row no
  token names (a T5 checkpoint's padding rows: `<unused_id_ID>`)."""
  parts, run = [], []
  own = has_own_sentinels(tokenizer)
  for t in (int(i) for i in ids):
    if t < tokenizer.vocab_size:
      run.append(t)
      continue
    if run:
      parts.append(tokenizer.decode(run))
      run = []
    parts.append(f"<unused_id_{t}>" if own else f"<extra_id_{vocab_size - 1 - t}>")
  if run:
    parts.append(tokenizer.decode(run))
  return "".join(parts)


def switch_generate_text(model, variables, tokenizer, eos_id, prompt: str, max_new_tokens: int,
                         sampling: SamplingConfig, stream=None, seed: int = 0) -> SwitchGeneration:
  """Output of a Switch model for the encoder input `prompt` (serve.switch_generate: greedy, or
  sampled with `sampling` and `seed`), cut at `eos_id` (None: never), written as text to `stream`
  (default stdout). When the tokenizer holds its own sentinels (T5's), the ids above its
  vocabulary are padding rows and are never drawn (SamplingConfig.vocab_limit); when the
  sentinels sit above the tokenizer, every id is one."""
  if has_own_sentinels(tokenizer):
    sampling = dataclasses.replace(sampling, vocab_limit=tokenizer.vocab_size)
  stream = sys.stdout if stream is None else stream
  vocab = model.cfg.vocab_size
  ids = encode_switch_prompt(tokenizer, vocab, prompt)
  if not ids:
    raise BadRequest("the prompt is empty; the encoder needs at least one token")
  start = time.perf_counter()
  tokens = [int(t) for t in switch_generate(model, variables, [ids], max_new_tokens,
                                            sampling=sampling, seed=seed)[0]]
  seconds = time.perf_counter() - start
  if eos_id is not None and eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  text = switch_text(tokenizer, vocab, tokens)
  stream.write(text + "\n")
  stream.flush()
  return SwitchGeneration(tokens, text, len(ids), seconds)
