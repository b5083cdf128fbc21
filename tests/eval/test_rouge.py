"""ROUGE-1/2/Lsum of greedy Switch summaries: rouge-score's own numbers, batching that changes nothing."""

import numpy as np
import pytest

pytest.importorskip("rouge_score", reason="ROUGE needs rouge-score (pip install -e .[data])")
from rouge_score import rouge_scorer  # noqa: E402

from moeqjax.eval.rouge import greedy_summaries, rouge_eval, rouge_scores, split_sentences
from moeqjax.model import QuantRules, SwitchTransformer
from moeqjax.serve import load_packed, pack, switch_greedy

from switch_student import MIXED, ids, switch_cfg, switch_student

REFERENCE = 'The cat sat on the mat. It purred loudly! Was it happy? "Yes." Dogs barked\nall night'
SUMMARY = "A cat sat on a mat. The cat purred. Dogs were barking all night"


def test_split_sentences_puts_one_sentence_a_line():
  assert split_sentences(REFERENCE).split("\n") == [
      "The cat sat on the mat.", "It purred loudly!", "Was it happy?", '"Yes."', "Dogs barked",
      "all night"]
  assert split_sentences("  no end mark  \n\n") == "no end mark"
  assert split_sentences("3.5 percent. Next") == "3.5 percent.\nNext"  # no space after "3."


def test_scores_are_rouge_scores_own_and_identical_texts_score_one():
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeLsum"], use_stemmer=True)
  want = scorer.score(split_sentences(REFERENCE), split_sentences(SUMMARY))
  other = scorer.score("Nothing in common", "A cat sat.")
  got = rouge_scores([SUMMARY, "A cat sat."], [REFERENCE, "Nothing in common"])
  for t in ("rouge1", "rouge2", "rougeLsum"):
    assert got[t] == pytest.approx((want[t].fmeasure + other[t].fmeasure) / 2, abs=1e-12)
    assert got["per_example"][0][t] == pytest.approx(want[t].fmeasure, abs=1e-12)
  assert 0 < got["rougeLsum"] < 1 and got["num_examples"] == 2
  # Lsum differs from a one-line reading of the same texts: the split matters.
  flat = scorer.score(REFERENCE.replace("\n", " "), SUMMARY)["rougeLsum"].fmeasure
  assert flat != pytest.approx(want["rougeLsum"].fmeasure)
  same = rouge_scores([REFERENCE, SUMMARY], [REFERENCE, SUMMARY])
  assert all(same[t] == 1.0 for t in ("rouge1", "rouge2", "rougeLsum"))
  with pytest.raises(ValueError, match="2 summaries for 1 references"):
    rouge_scores(["a", "b"], ["a"])


def _decode(ids_):
  return ". ".join(f"w{t}" for t in ids_)  # every token a one-word sentence


def test_rouge_eval_of_fake_quant_and_packed_student(tmp_path):
  # Untied: a tied random model repeats its decoder input (the start token) every step.
  cfg = switch_cfg(QuantRules(expert_code=1), tie_embeddings=False)
  params, quant = switch_student(cfg, MIXED)
  variables = {"params": params, "quant": quant}
  sources = [ids(1, n, seed=n)[0].tolist() for n in (9, 4, 6)]  # 2 batches of 2, padded to 9
  examples = [(s, ref) for s, ref in zip(sources, ["w3. w5", "w7", "w1. w2. w3"])]
  got = rouge_eval(cfg, variables, examples, _decode, max_new_tokens=4, batch_size=2)
  # A padded summary (in a full batch, and in the filled-up last one) is the source's own
  # unpadded, unbatched greedy decode.
  model = SwitchTransformer(cfg)
  alone = [switch_greedy(model, variables, np.asarray([s]), 4)[0].tolist() for s in sources[1:]]
  assert got["summaries"][1:] == [_decode(t) for t in alone]
  assert len(set(got["summaries"])) > 1  # not one constant summary
  want = rouge_scores(got["summaries"], [r for _, r in examples])
  assert {t: got[t] for t in want if t != "per_example"} == {
      t: want[t] for t in want if t != "per_example"}
  # The packed student decodes the same summaries.
  pack(cfg, params, quant, tmp_path / "packed")
  served = load_packed(tmp_path / "packed")
  assert rouge_eval(cfg, served.variables, examples, _decode, max_new_tokens=4,
                    batch_size=2)["summaries"] == got["summaries"]
  # eos cuts a summary before it.
  eos = alone[0][2]
  cut = greedy_summaries(cfg, variables, sources, max_new_tokens=4, batch_size=2, eos_id=eos)
  assert cut[1] == alone[0][:alone[0].index(eos)]
