"""A packed Switch student: the manifest names its family, the bytes are packed, and the packed
forward and greedy decoding equal the fake-quant student's (the oracle) in float32, and sampled
decoding draws what the uncached forward's logits give."""

import json

import jax
import numpy as np
import pytest

from moeqjax.convert.student_weights import ParamWeights
from moeqjax.model import QuantRules, SwitchConfig, SwitchTransformer
from moeqjax.serve import SamplingConfig, load_packed, pack, sample, switch_generate, switch_greedy
from moeqjax.serve.checkpoint import PackedCheckpointError, moe_blocks, open_packed
from moeqjax.serve.packed_source import PackedWeights

from conftest import tiny_model_config
from switch_student import MIXED, ids, switch_cfg, switch_student

# A dense encoder layer next to the sparse one, untied embeddings: every kind of packed matrix
# (attention int8, dense FFN int3, lm_head int4) and experts at every code.
RULES = QuantRules(expert_code=1, attn_code=8, shared_code=3, lm_head_code=4)
CFG = switch_cfg(RULES, num_layers=2, num_sparse_encoder_layers=1, tie_embeddings=False)


def _logits(model, variables, enc, dec):
  return np.asarray(jax.jit(model.apply)(variables, enc, dec)[0])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  params, quant = switch_student(CFG)
  out = tmp_path_factory.mktemp("switch") / "packed"
  manifest = pack(CFG, params, quant, out)
  return params, quant, out, manifest


def test_packed_logits_and_greedy_tokens_equal_fake_quant(packed):
  params, quant, out, _ = packed
  served = load_packed(out)
  assert isinstance(served.cfg, SwitchConfig) and served.cfg == CFG
  assert isinstance(served.model, SwitchTransformer)
  student = SwitchTransformer(CFG)
  enc, dec = ids(2, 9), ids(2, 5, seed=1)
  want = _logits(student, {"params": params, "quant": quant}, enc, dec)
  got = _logits(served.model, served.variables, enc, dec)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  teacher = _logits(student, {"params": params}, enc, dec)
  assert np.abs(teacher - want).max() > 1e-3  # the codes matter: the equality is not vacuous
  new = 5
  want_tokens = switch_greedy(student, {"params": params, "quant": quant}, enc, new)
  assert len(np.unique(want_tokens)) > 1  # not a constant token
  np.testing.assert_array_equal(switch_greedy(served.model, served.variables, enc, new),
                                want_tokens)


@pytest.mark.parametrize("rule", [SamplingConfig(temperature=0.8, top_k=6),
                                  SamplingConfig(temperature=1.3, top_p=0.9, vocab_limit=30)])
def test_sampled_tokens_are_the_uncached_forwards_draws(packed, rule):
  """The packed model's sampled decoding (cached steps) draws, at every step i, what `sample` draws
  with fold_in(key(seed), i) from the fake-quant student's full forward over the tokens so far."""
  params, quant, out, _ = packed
  served = load_packed(out)
  enc, new, seed = ids(2, 9, seed=4), 6, 11
  got = switch_generate(served.model, served.variables, enc, new, sampling=rule, seed=seed)
  student, variables = SwitchTransformer(CFG), {"params": params, "quant": quant}
  forward = jax.jit(student.apply)
  rng = jax.random.key(seed)
  prefix = np.full((2, 1), CFG.decoder_start_token_id, np.int32)
  for i in range(new):
    logits = forward(variables, enc, prefix)[0][:, -1]
    want = np.asarray(sample(logits, jax.random.fold_in(rng, i), rule))
    np.testing.assert_array_equal(got[:, i], want, err_msg=f"step {i}")
    prefix = np.concatenate([prefix, got[:, i:i + 1]], axis=1)
  assert rule.vocab_limit == 0 or got.max() < rule.vocab_limit
  greedy = switch_greedy(served.model, served.variables, enc, new)
  assert not np.array_equal(got, greedy)  # the draws are not the argmax path


def test_manifest_records_the_family_and_the_packed_bytes(packed):
  params, _, out, manifest = packed
  assert manifest["model_family"] == "switch"
  assert manifest["expert_codes"] == MIXED
  assert moe_blocks(CFG) == ["encoder/layers_1/moe", "decoder/layers_0/moe"]
  on_disk = json.loads((out / "manifest.json").read_text())
  assert on_disk["model_family"] == "switch" and on_disk["model_config"]["num_layers"] == 2
  # Expert values hold exactly `bits` bits a weight (ternary at 1.6 bits under base3 packing is
  # not the default: 2 bits), for w_in [16, 32] and w_out [32, 16] of each expert.
  bits = {1: 2, 2: 2, 3: 3, 4: 4, 8: 8}
  values = sum(rec["nbytes"] for rec in manifest["tensors"].values()
               if rec["role"] == "values" and rec["param"].split("/")[-1] in ("w_in", "w_out"))
  assert values == sum(2 * 16 * 32 * bits[c] // 8 for row in MIXED for c in row)
  assert manifest["bytes"]["expert_tensors_on_disk"] == manifest["bytes"]["expert_bytes_accounted"]
  assert not any("w_gate" in rec["param"] for rec in manifest["tensors"].values())  # ReLU experts
  assert {rec["code"] for rec in manifest["tensors"].values()
          if rec["param"] == "encoder/layers_0/dense_mlp/wi/kernel"} == {3}
  assert manifest["tensors"]["lm_head.kernel.int4.values"]["dtype"] == "U8"
  # The packed folder read back as integer forms (what exports from a pack folder read) is the
  # student's quantized weights exactly.
  source, ours = PackedWeights(out), ParamWeights(CFG, params, packed[1])
  for path in (("decoder", "layers_0", "moe", "w_out"), ("encoder", "layers_1", "moe", "w_in"),
               ("encoder", "layers_0", "self_attn", "q_proj", "kernel")):
    np.testing.assert_array_equal(source.codes(path), ours.codes(path))
    np.testing.assert_array_equal(source.dequantized(path), ours.dequantized(path))


def test_a_manifest_without_a_family_is_decoder_only(tmp_path):
  """Packs written before Switch support have no model_family: they stay decoder-only."""
  from moeqjax.model import ModelConfig, default_quant, init_model
  cfg = tiny_model_config(num_layers=1)
  _, params, quant = init_model(cfg, jax.random.key(0))
  manifest = pack(cfg, params, default_quant(cfg), tmp_path / "p")
  assert manifest["model_family"] == "moe_transformer"
  del manifest["model_family"]
  (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
  _, back = open_packed(tmp_path / "p")
  assert isinstance(back, ModelConfig) and back == cfg
  manifest["model_family"] = "t5"
  (tmp_path / "p" / "manifest.json").write_text(json.dumps(manifest))
  with pytest.raises(PackedCheckpointError, match="unknown model_family 't5'") as e:
    open_packed(tmp_path / "p")
  assert "\n" not in str(e.value)


def test_full_precision_expert_is_refused(tmp_path):
  cfg = switch_cfg()
  params, quant = switch_student(cfg, codes=[[1, 0, 1, 1], [1, 1, 1, 1]])
  with pytest.raises(PackedCheckpointError, match=r"encoder/layers_0/moe/w_in: expert\(s\) \[1\]"):
    pack(cfg, params, quant, tmp_path / "p")
  assert not (tmp_path / "p").exists()
