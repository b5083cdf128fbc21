"""Running an export in its real runtime: llama.cpp (GGUF) and transformers + compressed-tensors, on CPU."""

# These need the `export` extra (llama-cpp-python; torch, transformers, compressed-tensors); each
# check says which package is missing instead of failing on import (see `missing`).

from __future__ import annotations

import importlib.metadata
import importlib.util

import numpy as np

GGUF_PACKAGES = ("llama_cpp",)
CT_PACKAGES = ("torch", "transformers", "compressed_tensors")
LLAMA_CTX = 64


def missing(modules) -> list[str]:
  """The modules of `modules` that are not installed."""
  return [m for m in modules if importlib.util.find_spec(m) is None]


def versions(dists) -> str:
  """'name version, ...' of installed distributions (for the report)."""
  return ", ".join(f"{d} {importlib.metadata.version(d)}" for d in dists)


def open_llama(path, n_ctx: int = LLAMA_CTX):
  """A llama.cpp model on CPU with logits for every position and a float32 KV cache."""
  import llama_cpp
  return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True,
                         verbose=False, n_threads=2, type_k=0, type_v=0)


def llama_greedy(path, prompt, steps: int, n_ctx: int = LLAMA_CTX) -> list[int]:
  """llama.cpp's greedy tokens after `prompt` (token ids), decoding one at a time from its KV cache."""
  llm = open_llama(path, n_ctx)
  llm.eval(list(prompt))
  tokens = []
  for i in range(steps):
    tokens.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    if i + 1 < steps:
      llm.eval([tokens[-1]])
  llm.close()
  return tokens


def llama_logits(path, tokens, n_ctx: int = LLAMA_CTX) -> np.ndarray:
  """llama.cpp's logits [len(tokens), V] (float64) for a given sequence (teacher forcing)."""
  llm = open_llama(path, n_ctx)
  llm.eval(list(tokens))
  logits = np.array(llm.scores[:len(tokens)], np.float64)
  llm.close()
  return logits


def load_compressed_tensors(path):
  """A compressed-tensors folder loaded by transformers, dequantized on CPU in float32."""
  import transformers
  cfg = transformers.CompressedTensorsConfig(dequantize=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, quantization_config=cfg, attn_implementation="eager", dtype="float32")
  return model.eval()


def torch_logits(model, tokens_BxS) -> np.ndarray:
  """float32 logits [B, S, V] of a transformers model."""
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens_BxS))).logits.float().numpy()
