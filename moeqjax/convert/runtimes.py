"""Running an export in its real runtime: llama.cpp (GGUF) and transformers + compressed-tensors, on CPU."""

# These need the `export` extra (xllamacpp, a prebuilt llama.cpp; torch, transformers,
# compressed-tensors); each check says which package is missing instead of failing on import
# (see `missing`).

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import pathlib
import urllib.request

import numpy as np

GGUF_PACKAGES = ("xllamacpp",)
CT_PACKAGES = ("torch", "transformers", "compressed_tensors")
LLAMA_CTX = 64
LLAMA_THREADS = 2
# llama.cpp's server takes the softmax of its float32 logits in float32 before the log, so a
# log-probability below log(FLT_MIN) ~ -87.3 has lost precision (denormal) or underflowed to 0,
# which it writes as -FLT_MAX. Such values are returned as -inf: not comparable, only "tiny".
LOGPROB_FLOOR = float(np.log(np.finfo(np.float32).tiny))
PIN_TOKEN = 0  # the token each request samples (see llama_next); its text must be whole UTF-8


def missing(modules) -> list[str]:
  """The modules of `modules` that are not installed."""
  return [m for m in modules if importlib.util.find_spec(m) is None]


def versions(dists) -> str:
  """'name version, ...' of installed distributions (for the report)."""
  return ", ".join(f"{d} {importlib.metadata.version(d)}" for d in dists)


def open_llama(path, n_ctx: int = LLAMA_CTX):
  """llama.cpp on CPU (xllamacpp's in-process server): one slot of n_ctx tokens, float32 KV cache.

  The server also listens on a free loopback port (xllamacpp always starts it); only the
  tokenizer routes use it (`llama_tokenize`). It raises RuntimeError when the file does not load,
  after llama.cpp has printed why (errors only: verbosity 1).
  """
  import xllamacpp
  p = xllamacpp.CommonParams()
  p.model.path = str(path)
  p.n_ctx = p.n_batch = p.n_ubatch = n_ctx
  p.n_parallel = 1  # one slot owns the whole context, so each request continues its KV cache
  p.cpuparams.n_threads = p.cpuparams_batch.n_threads = LLAMA_THREADS
  p.n_threads_http = 1
  p.n_gpu_layers = 0
  p.cache_type_k = p.cache_type_v = xllamacpp.ggml_type.GGML_TYPE_F32
  # Plain attention, as llama-cpp-python ran it by default, so the compared path stays the same.
  p.flash_attn_type = xllamacpp.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
  p.cache_ram_mib = 0  # no host-memory prompt cache next to the slot's own KV cache
  p.fit_params = False  # no probing of device memory: the CPU build runs what it is given
  p.warmup = False
  p.verbosity = 1
  return xllamacpp.Server(p)


def llama_next(server, tokens, n_probs: int) -> list[dict]:
  """The n_probs most likely tokens after `tokens` (ids) by llama.cpp's logits, most likely first.

  One completion request of one token. The server keeps the previous request's KV cache and
  evaluates only the tokens after the common prefix, so calling this with a sequence one token
  longer each time decodes one token at a time. Each entry is {"id", "logprob", "bytes", "token"};
  the log-probabilities are the softmax of the raw logits (before any sampling or bias), sorted by
  logit, so the first entry is the greedy token.
  """
  res = server.handle_completions({
      "prompt": [int(t) for t in tokens], "max_tokens": 1, "temperature": 0.0,
      "n_probs": n_probs, "cache_prompt": True,
      # The server drops the log-probabilities of a sampled token whose bytes end in an incomplete
      # UTF-8 character (its text is held back for the next token), which a byte-level vocab hits
      # often. Sampling PIN_TOKEN instead always returns them; the bias is applied after the
      # log-probabilities are taken, so they are the model's own.
      "logit_bias": [[PIN_TOKEN, 1e9]]})
  if "error" in res:
    raise RuntimeError(f"llama.cpp refused the request: {res['error'].get('message', res)}")
  choice = res["choices"][0]
  if not choice.get("logprobs"):
    raise RuntimeError(f"llama.cpp returned no log-probabilities after {len(tokens)} tokens "
                       f"(finish_reason {choice.get('finish_reason')!r}): token {PIN_TOKEN} must "
                       f"render as whole UTF-8 text and the sequence must fit the context")
  return choice["logprobs"]["content"][0]["top_logprobs"]


def _check_fits(n_tokens: int, n_ctx: int):
  # A prompt that fills the context comes back without log-probabilities; keep 2 slots spare.
  if n_tokens + 2 > n_ctx:
    raise ValueError(f"{n_tokens} tokens do not fit llama.cpp's context of {n_ctx} with 2 to "
                     f"spare; pass a larger n_ctx")


def llama_greedy(path, prompt, steps: int, n_ctx: int = LLAMA_CTX) -> list[int]:
  """llama.cpp's greedy tokens after `prompt` (token ids), decoding one at a time from its KV cache.

  Each token is the one with llama.cpp's largest logit (its server sorts by logit), fed back as the
  next request's last token. Step by step rather than one request of `steps` tokens: a request
  stops at the model's end-of-generation token (ignore_eos would bias that to -inf), and would
  drop the log-probabilities of tokens that end mid-character (see llama_next).
  """
  _check_fits(len(prompt) + steps, n_ctx)
  tokens = [int(t) for t in prompt]
  server = open_llama(path, n_ctx)
  for _ in range(steps):
    tokens.append(int(llama_next(server, tokens, 1)[0]["id"]))
  del server  # its destructor stops the server's threads and frees the model
  return tokens[len(prompt):]


def llama_logprobs(path, tokens, n_ctx: int = LLAMA_CTX) -> np.ndarray:
  """llama.cpp's log-probabilities [len(tokens), V] (float64) of a given sequence (teacher forcing).

  Row i is the log-softmax of its logits after tokens[:i + 1]. llama.cpp's server returns no
  logits and no log-probabilities for prompt tokens, so each row is one request for a prefix
  one token longer than the last (one decode step from the KV cache). Values below LOGPROB_FLOOR
  are -inf.
  """
  _check_fits(len(tokens), n_ctx)
  tokens = [int(t) for t in tokens]
  rows = []
  server = open_llama(path, n_ctx)
  for i in range(len(tokens)):
    # n_probs above the vocabulary size is cut to it: every token's log-probability comes back.
    top = llama_next(server, tokens[:i + 1], 1 << 30)
    row = np.full(len(top), -np.inf)
    for t in top:
      row[t["id"]] = t["logprob"] if t["logprob"] >= LOGPROB_FLOOR else -np.inf
    rows.append(row)
  del server
  return np.stack(rows)


def llama_route(server, route: str, body: dict | None = None) -> dict:
  """One of llama.cpp's server routes (POST /tokenize, /detokenize; GET /props without a body)
  on the loopback port xllamacpp's server listens on.

  xllamacpp's Python API has no tokenizer call; these routes are llama.cpp's own.
  """
  data = None if body is None else json.dumps(body).encode()
  req = urllib.request.Request(server.listening_address + route, data,
                               {"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=60) as r:
    return json.loads(r.read())


def llama_tokenize(server, text: str, special: bool = False) -> list[int]:
  """llama.cpp's token ids for `text`, without BOS; `special` parses special tokens' text."""
  return llama_route(server, "/tokenize", {"content": text, "add_special": False,
                                           "parse_special": special})["tokens"]


def llama_detokenize(server, ids) -> str:
  """llama.cpp's text for token ids (UTF-8 decoded by the server)."""
  return llama_route(server, "/detokenize", {"tokens": [int(t) for t in ids]})["content"]


def llama_vocab(server) -> list[bytes]:
  """Every token's bytes by id, as llama.cpp renders it (token_to_piece), from one request."""
  top = llama_next(server, [PIN_TOKEN], 1 << 30)
  pieces = [b""] * len(top)
  for t in top:
    pieces[t["id"]] = bytes(t["bytes"])
  return pieces


def load_compressed_tensors(path):
  """A compressed-tensors folder loaded by transformers, dequantized on CPU in float32.

  A decoder-only family loads as AutoModelForCausalLM, a Switch Transformer (config.json
  is_encoder_decoder) as AutoModelForSeq2SeqLM.
  """
  import transformers
  cfg = transformers.CompressedTensorsConfig(dequantize=True)
  config = json.loads((pathlib.Path(path) / "config.json").read_text())
  auto = (transformers.AutoModelForSeq2SeqLM if config.get("is_encoder_decoder")
          else transformers.AutoModelForCausalLM)
  model = auto.from_pretrained(path, quantization_config=cfg, attn_implementation="eager",
                               dtype="float32")
  return model.eval()


def torch_logits(model, tokens_BxS) -> np.ndarray:
  """float32 logits [B, S, V] of a transformers model."""
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BxS))).logits.float().numpy()


def torch_seq2seq_logits(model, encoder_ids_BxS, decoder_ids_BxT) -> np.ndarray:
  """float32 logits [B, T, V] of a transformers encoder-decoder (no padding)."""
  import torch
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(np.asarray(encoder_ids_BxS), dtype=torch.long),
                 decoder_input_ids=torch.as_tensor(np.asarray(decoder_ids_BxT), dtype=torch.long)
                 ).logits.float().numpy()
