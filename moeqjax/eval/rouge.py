"""ROUGE-1/2/Lsum of a Switch Transformer's greedy summaries, scored by Google's `rouge-score`."""

# rouge-score (pip install rouge-score, in the `data` extra) is imported only when scoring, so the
# rest of moeqjax runs without it. ROUGE-Lsum is the summary-level LCS: it reads a summary as
# newline-separated sentences, so both the generated summaries and the references are first put
# one sentence a line by `split_sentences` (a plain rule, needing no sentence-splitter data).

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from moeqjax.model import SwitchConfig, SwitchTransformer
from moeqjax.serve.switch_decode import switch_greedy

ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")
# A sentence ends at ".", "!" or "?" (a closing quote or bracket after it kept with it) that is
# followed by whitespace; line breaks end sentences too.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+")


def split_sentences(text: str) -> str:
  """The text one sentence a line, as ROUGE-Lsum expects.

  Sentences end at line breaks and at ".", "!" or "?" (with one closing quote or bracket)
  followed by whitespace. It is a plain rule, not a trained splitter: "Dr. Smith" splits after
  "Dr.", and a sentence without final punctuation runs on to the next line break. The same rule
  applies to summaries and references, so it is consistent across the models compared.
  """
  lines = []
  for line in text.splitlines():
    lines.extend(s.strip() for s in _SENTENCE_END.split(line.strip()))
  return "\n".join(s for s in lines if s)


def _rouge_scorer(use_stemmer: bool):
  try:
    from rouge_score import rouge_scorer
  except ImportError:
    raise ImportError("ROUGE needs Google's rouge-score package: pip install rouge-score (or "
                      "pip install -e .[data])") from None
  return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)


def rouge_scores(summaries: Sequence[str], references: Sequence[str], *,
                 use_stemmer: bool = True) -> dict:
  """Mean ROUGE-1, ROUGE-2 and ROUGE-Lsum F-measures (in [0, 1]) over paired texts.

  Each text is put one sentence a line (`split_sentences`) before scoring; rouge-score's own
  tokenizer then lowercases it and keeps letters and digits (Porter-stemmed with use_stemmer).

  Returns:
    {"rouge1", "rouge2", "rougeLsum": mean F-measure, "per_example": [{type: F-measure}],
     "num_examples"}.
  """
  if len(summaries) != len(references):
    raise ValueError(f"{len(summaries)} summaries for {len(references)} references")
  if not summaries:
    raise ValueError("no examples to score")
  scorer = _rouge_scorer(use_stemmer)
  per_example = []
  for summary, reference in zip(summaries, references):
    # rouge-score's argument order is (target, prediction)
    scores = scorer.score(split_sentences(reference), split_sentences(summary))
    per_example.append({t: float(scores[t].fmeasure) for t in ROUGE_TYPES})
  out = {t: float(np.mean([s[t] for s in per_example])) for t in ROUGE_TYPES}
  return {**out, "per_example": per_example, "num_examples": len(per_example)}


def greedy_summaries(cfg: SwitchConfig, variables: dict, sources: Sequence[Sequence[int]], *,
                     max_new_tokens: int, batch_size: int = 8, eos_id: int | None = None,
                     pad_id: int = 0) -> list[list[int]]:
  """Greedy output ids of each source (switch_greedy), cut before the first eos_id.

  Sources are right-padded with pad_id to the longest one and masked; the last batch is filled
  up with copies of its first row, so every batch has one shape and compiles once. With no
  expert capacity (cfg.expert_capacity 0) a source's summary does not depend on its batch.

  Args:
    cfg: the model config.
    variables: {"params", "quant"} (fake-quant student), {"params"} (full precision), or a
      packed model's variables (serve.load_packed(...).variables).
    sources: encoder token ids, one list per example.
    max_new_tokens: the most tokens a summary has.
    batch_size: sources decoded at once.
    eos_id: where a summary ends (None: every summary has max_new_tokens tokens).
    pad_id: the encoder padding id (masked out, so any id works).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1")
  if not sources or any(len(s) == 0 for s in sources):
    raise ValueError("every source must have at least one token")
  model = SwitchTransformer(cfg)
  length = max(len(s) for s in sources)
  out = []
  for start in range(0, len(sources), batch_size):
    batch = list(sources[start:start + batch_size])
    n = len(batch)
    batch += [batch[0]] * (batch_size - n)
    ids = np.full((batch_size, length), pad_id, np.int32)
    mask = np.zeros((batch_size, length), bool)
    for i, s in enumerate(batch):
      ids[i, :len(s)], mask[i, :len(s)] = s, True
    tokens = switch_greedy(model, variables, ids, max_new_tokens, mask)
    for row in tokens[:n].tolist():
      out.append(row[:row.index(eos_id)] if eos_id is not None and eos_id in row else row)
  return out


def rouge_eval(cfg: SwitchConfig, variables: dict,
               examples: Sequence[tuple[Sequence[int], str]],
               decode: Callable[[list[int]], str], *, max_new_tokens: int, batch_size: int = 8,
               eos_id: int | None = None, pad_id: int = 0, use_stemmer: bool = True) -> dict:
  """ROUGE-1/2/Lsum of the model's greedy summaries against reference texts.

  Args:
    cfg: the Switch model config.
    variables: fake-quant ({"params", "quant"}), full-precision or packed model variables.
    examples: (source token ids, reference summary text) pairs.
    decode: token ids -> text (e.g. a tokenizer's `decode`; the ids exclude eos).
    max_new_tokens, batch_size, eos_id, pad_id: as in `greedy_summaries`.
    use_stemmer: Porter-stem words before matching (rouge-score's option).

  Returns:
    `rouge_scores`' dict (mean F-measures in [0, 1]) plus "summaries", the decoded texts.
  """
  ids = greedy_summaries(cfg, variables, [s for s, _ in examples], max_new_tokens=max_new_tokens,
                         batch_size=batch_size, eos_id=eos_id, pad_id=pad_id)
  summaries = [decode(t) for t in ids]
  scores = rouge_scores(summaries, [r for _, r in examples], use_stemmer=use_stemmer)
  return {**scores, "summaries": summaries}
