"""The CLI from a HF Switch checkpoint: import-hf -> qat -> ptq rtn -> stats -> eval -> export hf, against transformers and the library."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax.cli import main

from switch_micro import restore
from switch_models import build_switch_model, hf_forward

tokenizers = pytest.importorskip("tokenizers", reason="the checkpoint's tokenizer needs tokenizers")

WORDS = [f"w{i}" for i in range(40)]
SENTINELS = 4  # <extra_id_3> .. <extra_id_0>, the tokenizer's top ids as in T5's
PADDING = 3  # model rows above the tokenizer's ids (T5: 32128 rows for 32100 ids)
WINDOW, QAT_STEPS = 32, 2
SMALL = [f"--config.{k}" for k in (
    f"seq2seq.window={WINDOW}", f"qat.seq_len={WINDOW}", f"qat.steps={QAT_STEPS}",
    "qat.batch_size=4", "qat.warmup_steps=1", "qat.ckpt_every=0", "qat.log_every=1", "eval.num_batches=2",
    "eval.batch_size=4", "data.valid_fraction=0.2")]


def _t5_like_tokenizer(folder):
  """Words, then T5's <pad> </s> <unk> first and its sentinels at the top ids, <extra_id_0> last."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {t: i for i, t in enumerate(["<pad>", "</s>", "<unk>"] + WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens([f"<extra_id_{n}>" for n in reversed(range(SENTINELS))])
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  return tok


def _run(*args):
  assert main([str(a) for a in args]) == 0, args


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  w = tmp_path_factory.mktemp("switch_import")
  src = w / "src"
  src.mkdir()
  tok = _t5_like_tokenizer(src)
  vocab = tok.get_vocab_size() + PADDING
  hf = build_switch_model(vocab_size=vocab, expert_capacity=40, router_z_loss_coef=0.123)
  hf.save_pretrained(src)
  rng = np.random.RandomState(0)
  (w / "corpus.txt").write_text("\n".join(" ".join(rng.choice(WORDS, 12)) for _ in range(200)))
  _run("import-hf", "--hf-dir", src, "--out", w / "imp")
  _run("qat", "--teacher", w / "imp", "--workdir", w / "qat", "--data", w / "corpus.txt", *SMALL)
  _run("ptq", "--teacher", w / "imp", "--workdir", w / "rtn", "--method", "rtn", "--data",
       w / "corpus.txt", *SMALL)
  _run("stats", "--workdir", w / "qat")
  _run("eval", "--workdir", w / "qat", "--teacher", w / "imp")
  _run("export", "--workdir", w / "qat", "--format", "hf", "--out", w / "hf")
  # The paper's protocol: fine-tune the import on (text, summary) pairs, then eval (ROUGE).
  pairs = w / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, 10)),
                                       "summary": " ".join(rng.choice(WORDS, 3))}) + "\n"
                           for _ in range(20)))
  _run("qat", "--teacher", w / "imp", "--workdir", w / "pairs", *SMALL,
       f"--config.seq2seq.pairs={pairs}", "--config.seq2seq.source_len=12",
       "--config.seq2seq.target_len=5")
  _run("eval", "--workdir", w / "pairs")
  return w, hf, tok


def test_qat_on_pairs_from_the_import_and_eval_with_rouge(runs):
  w, _, _ = runs
  record = json.loads((w / "pairs" / "config.json").read_text())
  assert record["seq2seq"]["pairs"] == str(w / "pairs.jsonl") and record["teacher"] == str(w / "imp")
  result = json.loads((w / "pairs" / "eval.json").read_text())
  assert result["student"]["eval_examples"] > 0
  rouge = result["student"]["rouge"]
  if "skipped" not in rouge:  # rouge-score installed (the `data` extra)
    assert rouge["examples"] == 4  # the held-out fifth of 20 pairs
    assert rouge["rougeLsum_delta_vs_teacher"] == pytest.approx(
        rouge["rougeLsum"] - result["full_precision"]["rouge"]["rougeLsum"], abs=1e-12)


def _imported(w):
  from moeqjax.pipeline.config import load_config, switch_config
  from moeqjax.pipeline.import_hf import load_imported_params
  config = load_config(w / "imp" / "config.py")
  cfg = switch_config(config)
  return config, cfg, load_imported_params(w / "imp", cfg)


def _ids(vocab, batch, seq, seed):
  return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


def test_import_writes_a_switch_teacher_that_computes_transformers_logits(runs):
  from moeqjax.model import SwitchTransformer
  w, hf, tok = runs
  config, cfg, params = _imported(w)
  assert cfg.vocab_size == tok.get_vocab_size() + PADDING and cfg.num_experts == 4
  # T5's sentinels sit at the tokenizer's top ids, below the padded vocabulary's top
  assert config.seq2seq.first_sentinel_id == tok.token_to_id("<extra_id_0>") == cfg.vocab_size - 4
  assert config.seq2seq.num_sentinels == SENTINELS
  assert (w / "imp" / "tokenizer" / "tokenizer.json").is_file()
  # generate's prompt: <extra_id_0> is the tokenizer's own sentinel, not the padded top row
  from moeqjax.data import make_tokenizer
  from moeqjax.pipeline.serve import encode_switch_prompt
  prompt = encode_switch_prompt(make_tokenizer(str(w / "imp" / "tokenizer")), cfg.vocab_size,
                                "w1 <extra_id_0> w2")
  assert prompt == [tok.token_to_id("w1"), tok.token_to_id("<extra_id_0>"), tok.token_to_id("w2")]
  # and its output: the sentinel is the tokenizer's token, a padding row above it names no token
  from moeqjax.pipeline.serve import switch_text
  text = switch_text(make_tokenizer(str(w / "imp" / "tokenizer")), cfg.vocab_size,
                     [tok.token_to_id("<extra_id_0>"), cfg.vocab_size - 1])
  assert "<extra_id_0>" in text and text.endswith(f"<unused_id_{cfg.vocab_size - 1}>")
  assert json.loads((w / "imp" / "hf_config.json").read_text())["router_z_loss_coef"] == 0.123
  enc, dec = _ids(cfg.vocab_size, 2, 11, 1), _ids(cfg.vocab_size, 2, 6, 2)
  ours, _ = SwitchTransformer(cfg).apply({"params": params}, jnp.asarray(enc), jnp.asarray(dec))
  assert np.abs(hf_forward(hf, enc, dec).logits.numpy() - np.asarray(ours)).max() <= 1e-4


def test_eval_teacher_bits_equal_independent_evaluation(runs):
  from moeqjax.data import encode_corpus, load_corpus, make_tokenizer
  from moeqjax.data.seq2seq import span_corruption_batch
  from moeqjax.eval import evaluate_seq2seq
  w, _, tok = runs
  _, cfg, params = _imported(w)
  valid = encode_corpus(load_corpus(str(w / "corpus.txt"), 0.2),
                        make_tokenizer(str(w / "imp" / "tokenizer")), cfg.vocab_size).valid
  top = tok.token_to_id("<extra_id_0>")
  held = [span_corruption_batch(valid, 4, WINDOW, 1234, b, decoder_start_id=0,
                                sentinel_ids=[top - n for n in range(SENTINELS)])
          for b in range(2)]
  want = evaluate_seq2seq(cfg, {"params": params}, held)
  got = json.loads((w / "qat" / "eval.json").read_text())
  assert got["full_precision"]["bits_per_token"] == pytest.approx(want["bits_per_token"], rel=1e-6)
  assert got["student"]["bits_per_token"] != got["full_precision"]["bits_per_token"]
  assert json.loads((w / "rtn" / "config.json").read_text())["ptq"]["method"] == "rtn"
  assert (w / "qat" / "router_stats.json").is_file()


def test_exported_student_loads_in_transformers_with_fake_quant_logits(runs):
  import transformers
  from moeqjax.model import SwitchTransformer
  w, hf, _ = runs
  cfg, params, quant = restore(w / "imp" / "config.py", w / "qat", QAT_STEPS, "qat")
  exported = json.loads((w / "hf" / "config.json").read_text())
  assert exported["router_z_loss_coef"] == 0.123 and exported["eos_token_id"] == 1  # kept
  assert (w / "hf" / "tokenizer.json").is_file()
  back = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(w / "hf").eval()
  enc, dec = _ids(cfg.vocab_size, 2, 11, 3), _ids(cfg.vocab_size, 2, 6, 4)
  ours, _ = SwitchTransformer(cfg).apply({"params": params, "quant": quant}, jnp.asarray(enc),
                                         jnp.asarray(dec))
  teacher = hf_forward(hf, enc, dec).logits.numpy()
  assert np.abs(teacher - np.asarray(ours)).max() > 1e-3, "the ternary student equals the teacher"
  assert np.abs(hf_forward(back, enc, dec).logits.numpy() - np.asarray(ours)).max() <= 1e-4


def test_bad_inputs_are_one_line_errors(runs, tmp_path, capsys):
  from safetensors.torch import load_file, save_file
  w, _, _ = runs
  capsys.readouterr()
  assert main(["import-hf", "--hf-dir", str(w / "src"), "--out", str(w / "imp")]) == 2
  err = capsys.readouterr().err.strip()
  assert "already holds an imported checkpoint" in err and "\n" not in err
  assert main(["import-hf", "--hf-dir", str(w / "src"), "--out", str(tmp_path / "x"),
               "--config", "configs/tiny.py"]) == 2
  err = capsys.readouterr().err.strip()
  assert "switch_transformers" in err and "configs/switch_tiny.py" in err and "\n" not in err
  broken = tmp_path / "broken"
  shutil.copytree(w / "src", broken)
  tensors = load_file(broken / "model.safetensors")
  gone = "decoder.block.1.layer.2.mlp.experts.expert_2.wo.weight"
  del tensors[gone]
  save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
  assert main(["import-hf", "--hf-dir", str(broken), "--out", str(tmp_path / "y")]) == 2
  err = capsys.readouterr().err.strip()
  assert gone in err and "\n" not in err
  assert not (tmp_path / "y").exists()  # nothing written
