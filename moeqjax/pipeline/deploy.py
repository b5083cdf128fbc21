"""The demo's deploy check: packed QAT students exported to GGUF and compressed-tensors, run in those runtimes."""

from __future__ import annotations

import functools
import pathlib

import jax.numpy as jnp
import numpy as np

from moeqjax.convert import ConvertError, runtimes
from moeqjax.convert.ct_export import write_compressed_tensors
from moeqjax.convert.gguf_export import write_gguf
from moeqjax.serve import generate, load_packed
from moeqjax.serve.packed_source import PackedWeights

# Each one the demo has (qat_mixed and qat_gguf when it has them): the uniform ternary student, the
# per-expert mix that llama.cpp widens, and the per-tensor allocation that it holds as allocated.
DEPLOY_VARIANTS = ("qat_ternary", "qat_mixed", "qat_gguf")
DEPLOY_DIR = "deploy"  # workdir/deploy/<variant>/{model.gguf, compressed-tensors/}
NEW_TOKENS = 16  # greedy tokens llama.cpp must produce like our packed model
PROMPT_TOKENS = 32  # prompt + NEW_TOKENS fit llama.cpp's context of runtimes.LLAMA_CTX
# float32 logits of transformers vs our packed forward: |Δ| <= CT_LOGIT_TOL * max(1, max |logit|).
# Relative, because two float32 computations of one model differ by their summation order alone in
# proportion to the logits: our own KV-cache and whole-sequence logits differ by 6e-6 at the demo's
# max |logit| of 12.5 (5e-7 of it), so an absolute 1e-5 sat at the noise floor (1.05e-5 and
# 1.34e-5 were measured), while an export error (a wrong scale, code or layout) moves logits by
# orders of magnitude more.
CT_LOGIT_TOL = 1e-5


def not_checked(packages) -> str:
  if "xllamacpp" in packages:  # a core dependency, with wheels for Linux only
    return ("not checked: llama.cpp (xllamacpp) is not installed; it ships wheels for Linux "
            "x86-64 and aarch64 (pip install xllamacpp==2026.10.11549)")
  return (f"not checked: install the export extra with torch and transformers (pip install -e "
          f"'.[parity,export]'; missing {', '.join(packages)})")


def _ours(folder, prompt) -> tuple[list[int], np.ndarray]:
  """Our packed model's greedy tokens after `prompt`, and the logits [NEW_TOKENS, V] that chose
  them from one whole-sequence forward pass of the prompt and those tokens (the folder is read once).

  Whole-sequence, like for like with transformers: our own KV-cache logits differ from these by
  float32 summation order alone (6e-6 on the demo's logits of magnitude 12), about the bound's size.
  """
  served = load_packed(folder)
  gen = generate(served.model, served.variables, np.asarray(prompt)[None], NEW_TOKENS)
  tokens = [int(t) for t in gen.tokens[0, :NEW_TOKENS]]
  seq = jnp.asarray([list(prompt) + tokens[:-1]], jnp.int32)
  out = served.model.apply(served.variables, seq)
  logits = out[0] if isinstance(out, tuple) else out
  return tokens, np.asarray(logits[0, len(prompt) - 1:], np.float32)


def _gguf(weights: PackedWeights, out: pathlib.Path, prompt, ours) -> dict:
  """Writes the GGUF file; then llama.cpp's greedy tokens against our packed model's (`ours()`)."""
  row = {"file": None, "file_bytes": None, "loaded": None, "matched": None, "note": ""}
  if runtimes.missing(("gguf",)):
    row["note"] = "not written: the GGUF writer needs the gguf package (pip install gguf)"
    return row
  try:
    report = write_gguf(weights, out, tokenizer=weights.tokenizer, overwrite=True,
                        name=weights.folder.name)
  except ConvertError as e:
    row["note"] = f"not written: {e}"
    return row
  experts = [r for r in report["tensors"] if "_exps" in r["name"]]
  # widened: the export report's tensors stored in a type wider than some code's exact container.
  row.update(file=str(out), file_bytes=report["file_bytes"],
             ggml_types=sorted({r["ggml_type"] for r in experts}),
             expert_bytes=sum(r["file_bytes"] for r in experts),
             expert_bytes_packed=sum(r["moeqjax_bytes"] for r in experts),
             widened=list(report["widened"]))
  lacking = runtimes.missing(runtimes.GGUF_PACKAGES)
  if lacking:
    row["note"] = not_checked(lacking)
    return row
  want = ours()[0]
  try:
    theirs = runtimes.llama_greedy(out, prompt, NEW_TOKENS)
  except RuntimeError as e:  # xllamacpp's server raises RuntimeError on a failed load
    row.update(loaded=False, note=f"llama.cpp did not load it: {e}")
    return row
  same = next((i for i, (a, b) in enumerate(zip(want, theirs)) if a != b), NEW_TOKENS)
  row.update(loaded=True, matched=want == theirs, greedy_tokens_equal=same,
             runtime=runtimes.versions(("xllamacpp",)),
             note=f"llama.cpp greedy = ours for {same} of {NEW_TOKENS} tokens")
  return row


def check_compressed_tensors(weights: PackedWeights, out: pathlib.Path, logits_pair) -> dict:
  """Writes the compressed-tensors folder; then, with the export extra, transformers' float32
  logits against ours.

  logits_pair(model) -> (theirs, ours): float32 logits of the loaded transformers model and of our
  packed model on the same inputs, over whole sequences on both sides (like for like); the
  bound is CT_LOGIT_TOL x max(1, max |ours|). Both model families' deploy checks use this.
  """
  row = {"file": None, "file_bytes": None, "loaded": None, "matched": None, "note": ""}
  try:
    report = write_compressed_tensors(weights, out, dtype="float32", overwrite=True)
  except ConvertError as e:
    row["note"] = f"not written: {e}"
    return row
  row.update(file=str(out), file_bytes=report["file_bytes"],
             expert_container=report["expert_container"])
  lacking = runtimes.missing(runtimes.CT_PACKAGES)
  if lacking:
    row["note"] = not_checked(lacking)
    return row
  try:
    model = runtimes.load_compressed_tensors(out)
  except (ValueError, RuntimeError, OSError) as e:
    row.update(loaded=False, note=f"transformers did not load it: {e}")
    return row
  theirs, ours = logits_pair(model)
  diff = float(np.abs(theirs - ours).max())
  bound = CT_LOGIT_TOL * max(1.0, float(np.abs(ours).max()))
  row.update(loaded=True, matched=diff <= bound, max_abs_logit_diff=diff, logit_bound=bound,
             runtime=runtimes.versions(("transformers", "compressed-tensors")),
             note=f"transformers + compressed-tensors logits within {diff:.3g} of ours "
                  f"(bound {bound:.3g} = {CT_LOGIT_TOL:g} x max |logit|"
                  f"{'' if diff <= bound else ': over it'})")
  return row


def _compressed_tensors(weights: PackedWeights, out: pathlib.Path, prompt, ours) -> dict:
  """check_compressed_tensors over the prompt and our greedy tokens, at the positions where our
  packed model (KV cache) chose those tokens."""

  def logits_pair(model):
    tokens, logits = ours()
    seq = np.asarray(list(prompt) + tokens[:-1], np.int32)[None]
    return runtimes.torch_logits(model, seq)[0, len(prompt) - 1:], logits

  return check_compressed_tensors(weights, out, logits_pair)


def deploy_packed(workdir: pathlib.Path, packed: dict, prompt_ids) -> dict:
  """Exports each packed student to GGUF and compressed-tensors and checks them in their runtimes.

  Args:
    workdir: the demo workdir; exports go to workdir/deploy/<variant>/.
    packed: variant name -> its packed folder (exported from its stored codes, not re-quantized).
    prompt_ids: held-out token ids; the first PROMPT_TOKENS are the prompt.

  Returns:
    {variant: {"gguf": row, "compressed_tensors": row}}, each row with file, file_bytes, loaded
    and matched (None when not checked) and a note saying what was compared or why not.
  """
  prompt = [int(t) for t in np.asarray(prompt_ids)[:PROMPT_TOKENS]]
  out = {}
  for name, folder in packed.items():
    weights = PackedWeights(folder)
    # Our generation runs once per student, and only when a runtime check needs it.
    ours = functools.cache(functools.partial(_ours, folder, tuple(prompt)))
    where = workdir / DEPLOY_DIR / name
    out[name] = {"gguf": _gguf(weights, where / "model.gguf", prompt, ours),
                 "compressed_tensors": _compressed_tensors(weights, where / "compressed-tensors",
                                                           prompt, ours)}
  return out
