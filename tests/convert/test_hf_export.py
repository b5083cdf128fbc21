"""Export round trip: our quantized student, dequantized into the HF layout, loads in transformers with equal logits."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="HF export tests need torch (pip install -e .[parity])")
transformers = pytest.importorskip("transformers", reason="HF export tests need transformers")

import moeqjax
from moeqjax.model import default_quant, set_expert_codes
from moeqjax.convert import export_hf, read_hf_config
from moeqjax.model import MoETransformer, QuantRules, forward_with_aux
from hf_models import build_hf_model, hf_logits_and_routing, save_hf_model, tokens


@pytest.mark.parametrize("family,e,k,norm", [("mixtral", 4, 2, True), ("qwen2_moe", 4, 2, False),
                                             ("qwen3_moe", 4, 2, True), ("olmoe", 4, 2, False)])
def test_quantized_export_matches_our_forward(tmp_path, family, e, k, norm):
  src = save_hf_model(build_hf_model(family, e, k, norm), tmp_path / "src")
  model, params = moeqjax.from_hf(src)
  # Mixed expert codes (ternary, int2, int4, int8) plus quantized attention / shared / lm_head.
  cfg = model.cfg.replace(quant=QuantRules(expert_code=4, attn_code=8, shared_code=4,
                                           lm_head_code=8, granularity="channel"))
  quant = set_expert_codes(default_quant(cfg), [[1, 2, 4, 8], [8, 4, 1, 2]])
  toks = tokens(2, 12)
  ours = np.asarray(MoETransformer(cfg).apply({"params": params, "quant": quant},
                                              jnp.asarray(toks)))
  fp = np.asarray(model.apply({"params": params}, jnp.asarray(toks)))
  assert np.abs(ours - fp).max() > 1e-2, "quantization should change the logits"

  out = export_hf(cfg, params, quant, tmp_path / "out", read_hf_config(src), "float32")
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  assert hf.config.model_type == family
  theirs, _ = hf_logits_and_routing(hf, toks)
  assert np.abs(ours - theirs).max() <= 1e-4

  out16 = export_hf(cfg, params, quant, tmp_path / "out16", read_hf_config(src), "bfloat16")
  assert json.loads((out16 / "config.json").read_text())["dtype"] == "bfloat16"
  hf16 = transformers.AutoModelForCausalLM.from_pretrained(out16, attn_implementation="eager")
  theirs16, idx16 = hf_logits_and_routing(hf16.float().eval(), toks)
  # bf16 rounding can flip a near-tied routing decision; a flip changes that token and, through
  # attention, every later one. So compare each sequence up to its first flip, and require the
  # flips to be rare.
  _, aux = forward_with_aux(MoETransformer(cfg), {"params": params, "quant": quant},
                            jnp.asarray(toks))
  ours_idx = np.sort(np.asarray(aux["expert_idx"]), axis=-1)  # [L, B*S, K]
  same_BxS = np.all(ours_idx == idx16, axis=(0, 2)).reshape(toks.shape)
  before_flip = np.cumprod(same_BxS, axis=1).astype(bool)
  assert before_flip.mean() >= 0.5, same_BxS
  per_token = np.abs(ours - theirs16).mean(axis=-1)
  assert np.all(per_token[before_flip] < 0.05 * np.abs(ours).mean()), per_token


def test_export_without_template_and_sharded(tmp_path):
  src = save_hf_model(build_hf_model("qwen2_moe", 4, 2, True), tmp_path / "src")
  model, params = moeqjax.from_hf(src)
  out = export_hf(model.cfg, params, None, tmp_path / "out", None, "float32",
                  max_shard_bytes=30_000)
  assert (out / "model.safetensors.index.json").is_file()
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  toks = tokens(1, 10)
  theirs, _ = hf_logits_and_routing(hf, toks)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(toks)))
  assert np.abs(ours - theirs).max() <= 1e-4
  # and it imports back to the same params
  _, again = moeqjax.from_hf(out)
  import jax
  jax.tree.map(np.testing.assert_array_equal, params, again)
