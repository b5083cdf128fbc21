"""The GGUF export runs in real llama.cpp (llama-cpp-python): same greedy tokens, near-equal logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax.convert.gguf_export import export_gguf
from moeqjax.convert.runtimes import LLAMA_CTX, llama_greedy, llama_logits
from moeqjax.convert.runtimes import open_llama as _llama
from moeqjax.model import MoETransformer, QuantRules

from gguf_models import gguf_cfg, student

pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")
llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (the `export` extra)")

CTX = LLAMA_CTX
NEW_TOKENS = 16
PROMPT = list(b"def main():\n  return ")
KL_TOL = 1e-2  # llama.cpp rounds activations to 8 bits in quantized matmuls
CONTROL_KL_TOL = 1e-5  # all-F32 file: float32 everywhere, only summation order differs

# Layout families by config fields (llama.cpp arch in the comment).
FAMILIES = {
    "mixtral_like": dict(),  # llama (interleaved rope: Q/K rows permuted)
    "qwen3_moe": dict(qk_norm="head"),  # qwen3moe
    "qwen2_moe": dict(shared_d_ff=256, shared_expert_gate=True, attn_bias=True,
                      norm_topk_prob=False),  # qwen2moe
    "olmoe": dict(qk_norm="full", num_kv_heads=4, norm_topk_prob=False),  # olmoe
}
STUDENTS = {"ternary": [[1, 1, 1, 1], [1, 1, 1, 1]], "mixed": [[1, 2, 4, 1], [4, 3, 1, 2]]}


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  model = MoETransformer(cfg)
  return jax.jit(lambda p, q, t: model.apply({"params": p, "quant": q}, t))


def ours_run(cfg, params, quant, prompt, steps):
  """Greedy tokens by re-forwarding the growing sequence (padded to CTX: the model is causal)."""
  fwd = _forward(cfg)
  tokens = list(prompt)
  for _ in range(steps):
    padded = jnp.asarray([tokens + [0] * (CTX - len(tokens))], jnp.int32)
    logits = np.asarray(fwd(params, quant, padded))[0]
    tokens.append(int(np.argmax(logits[len(tokens) - 1])))
  return tokens[len(prompt):], np.asarray(logits[:len(tokens) - 1], np.float64)


def top10_kl(ours, theirs):
  """Per position KL(ours || theirs) over our top-10 tokens, each renormalised over those 10."""
  idx = np.argsort(-ours, axis=-1)[:, :10]
  p = np.take_along_axis(ours, idx, -1)
  q = np.take_along_axis(theirs, idx, -1)
  p = p - np.logaddexp.reduce(p, axis=-1, keepdims=True)
  q = q - np.logaddexp.reduce(q, axis=-1, keepdims=True)
  return np.sum(np.exp(p) * (p - q), axis=-1)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
  cfg = gguf_cfg(quant=QuantRules(expert_code=1, granularity="channel"),
                 **FAMILIES[request.param])
  return request.param, cfg, tmp_path_factory.mktemp(request.param)


def _margins(logits):
  top2 = np.sort(logits, axis=-1)[:, -2:]
  return top2[:, 1] - top2[:, 0]


@pytest.mark.parametrize("which", sorted(STUDENTS))
def test_llama_cpp_matches_our_forward(family, which):
  name, cfg, tmp = family
  params, quant = student(cfg, STUDENTS[which], seed=1)
  want, ours = ours_run(cfg, params, quant, PROMPT, NEW_TOKENS)
  seq = PROMPT + want[:-1]  # ours[i] predicts seq[i + 1]; the last NEW_TOKENS rows are greedy steps
  path = tmp / f"{which}.gguf"
  report = export_gguf(cfg, params, quant, path)
  types = {r["name"]: r["ggml_type"] for r in report["tensors"]}
  assert types["blk.0.ffn_up_exps.weight"] == ("TQ2_0" if which == "ternary" else "Q4_0")
  theirs = llama_logits(path, seq)
  kl = top10_kl(ours, theirs)
  err = np.abs(theirs - ours).max()
  # A greedy step is decisive when our top-1 leads by more than twice the largest logit difference
  # llama.cpp's int8 activations cause; at a near-tie below that, either token is a correct result.
  margin = _margins(ours)[-NEW_TOKENS:]
  decisive = margin > 2 * err
  theirs_argmax = theirs.argmax(-1)[-NEW_TOKENS:]
  tokens = llama_greedy(path, PROMPT, NEW_TOKENS)
  first_tie = int(np.argmin(decisive)) if not decisive.all() else NEW_TOKENS
  print(f"{name}/{which}: top-10 KL max {kl.max():.2e} mean {kl.mean():.2e}, max |dlogit| "
        f"{err:.2f}; greedy {sum(a == b for a, b in zip(tokens, want))}/{NEW_TOKENS} "
        f"(decisive steps {decisive.sum()}, first near-tie {first_tie})")
  assert kl.max() < KL_TOL
  assert decisive.sum() >= NEW_TOKENS // 2, "too few decisive steps for the greedy check to bite"
  np.testing.assert_array_equal(theirs_argmax[decisive], np.asarray(want)[decisive])
  assert tokens[:first_tie] == want[:first_tie]
  if which != "ternary":
    return
  # Control (once per layout): the same student dequantized into an all-F32 file agrees to float32
  # rounding, so the tolerance above is not hiding a layout error; its greedy tokens are ours.
  control = tmp / f"{which}_f32.gguf"
  export_gguf(cfg, params, quant, control, all_f32=True)
  c_logits = llama_logits(control, seq)
  c_kl = top10_kl(ours, c_logits)
  print(f"{name}/{which} all-F32 control: top-10 KL max {c_kl.max():.2e}, "
        f"max |dlogit| {np.abs(c_logits - ours).max():.2e}")
  assert c_kl.max() < CONTROL_KL_TOL
  assert llama_greedy(control, PROMPT, NEW_TOKENS) == want


def test_layout_error_would_show(tmp_path, monkeypatch):
  # Without llama's Q/K row permutation the all-F32 file is wrong, and the KL says so.
  from moeqjax.convert import gguf_arch
  cfg = gguf_cfg()
  params, quant = student(cfg, STUDENTS["ternary"], seed=1)
  want, ours = ours_run(cfg, params, quant, PROMPT, NEW_TOKENS)
  monkeypatch.setattr(gguf_arch, "LLAMA", gguf_arch.Arch("llama", False, True, False))
  export_gguf(cfg, params, quant, tmp_path / "wrong.gguf", all_f32=True)
  theirs = llama_logits(tmp_path / "wrong.gguf", PROMPT + want[:-1])
  assert top10_kl(ours, theirs).max() > KL_TOL


def test_byte_vocab_tokenizes_text_to_our_byte_ids(tmp_path):
  cfg = gguf_cfg(d=64, f=64, num_layers=1)
  params, quant = student(cfg)
  export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  llm = _llama(tmp_path / "m.gguf")
  text = "héllo wörld\n\tdef f(x): return x  # ≠ 🙂".encode()
  assert llm.tokenize(text, add_bos=False, special=False) == list(text)
  assert llm.detokenize(list(text)) == text
  assert llm.n_vocab() == 256
  llm.close()


def test_bpe_tokenizer_json_loads_and_tokenizes_like_hf(tmp_path):
  import json
  tokenizers = pytest.importorskip("tokenizers", reason="needs the `data` extra (tokenizers)")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, then sleeps."] * 20,
                          trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  cfg = gguf_cfg(d=64, f=64, num_layers=1, vocab_size=320)
  params, quant = student(cfg)
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf", tokenizer=tmp_path)
  assert report["vocab"].endswith("tokenizer.json")
  llm = _llama(tmp_path / "m.gguf")
  text = "the lazy fox jumps over the quick dog, then sleeps."
  ids = tok.encode(text).ids
  assert len(ids) < len(text)  # merges were used
  assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
  assert llm.detokenize(ids) == text.encode()
  assert llm.token_eos() == tok.token_to_id("<|endoftext|>")
  assert llm.n_vocab() == 320
  llm.close()
