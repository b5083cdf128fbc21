"""compressed-tensors export: transformers decompresses every weight exactly to ours, and the logits match."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="needs torch (pip install -e .[parity])")
pytest.importorskip("compressed_tensors", reason="needs the `export` extra (compressed-tensors)")

from moeqjax.convert import export_hf
from moeqjax.convert.ct_export import export_compressed_tensors
from moeqjax.model import MoETransformer
from moeqjax.quant import quantize_dequantize

from ct_models import ct_student, load_ct, logits, tokens

TERNARY, MIXED = [[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 2, 4, 3], [4, 1, 2, 1]]
# name: (family, expert codes, quant rules, expert container, dense container)
CASES = {
    "mixtral_ternary": ("mixtral", TERNARY, {}, "int4", None),
    "mixtral_mixed_int8_attention": ("mixtral", MIXED, dict(attn_code=8), "int4", "int8"),
    "qwen2_moe_ternary_shared": ("qwen2_moe", TERNARY, dict(shared_code=1), "int4", "int4"),
    "qwen2_moe_mixed_asymmetric_group": ("qwen2_moe", MIXED, dict(
        symmetric=False, granularity="group", group_size=32, shared_code=4, attn_code=3),
        "int8", "int4"),
    "qwen3_moe_ternary": ("qwen3_moe", TERNARY, {}, "int4", None),
    "qwen3_moe_mixed_int8": ("qwen3_moe", [[1, 8, 4, 2], [8, 8, 8, 8]], dict(
        granularity="group", group_size=64, learn_clip=True), "int8", None),
    "olmoe_ternary_tensor_scale": ("olmoe", TERNARY, dict(granularity="tensor"), "int4", None),
    "olmoe_mixed_asymmetric_int3": ("olmoe", [[3, 2, 3, 1], [2, 3, 3, 3]], dict(
        symmetric=False, attn_code=4, lm_head_code=4), "int4", "int4"),
}


def _with_clip(params, cfg):
  if not cfg.quant.learn_clip:
    return params
  rng = np.random.default_rng(1)
  for i in range(cfg.num_layers):
    moe = params[f"layers_{i}"]["moe"]
    for k in ("w_in_clip", "w_gate_clip", "w_out_clip"):
      moe[k] = np.asarray(rng.uniform(0.6, 1.2, np.shape(moe[k])), np.float32)
  return params


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_decompresses_exactly_and_logits_match(case, tmp_path):
  family, codes, rules, want_experts, want_dense = CASES[case]
  cfg, params, quant = ct_student(family, codes, **rules)
  params = _with_clip(params, cfg)
  report = export_compressed_tensors(cfg, params, quant, tmp_path / "ct", dtype="float32")
  assert (report["expert_container"], report["dense_container"]) == (want_experts, want_dense)
  qc = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
  assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
  ct = load_ct(tmp_path / "ct")
  assert ct.config.model_type == family

  # Every parameter equals ours dequantized in the HF layout: the same student written as plain
  # float32 weights (export_hf) and loaded into the same transformers classes.
  export_hf(cfg, params, quant, tmp_path / "plain", None, "float32", model_type=family)
  import transformers
  plain = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path / "plain", attn_implementation="eager", dtype="float32").eval()
  got, want = ct.state_dict(), plain.state_dict()
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name].numpy(), w.numpy(), err_msg=name)
  # ...and independently of export_hf, the fused down projection of layer 1 is ours, transposed.
  down = got["model.layers.1.mlp.experts.down_proj"].numpy()  # [E, D, F]
  moe = params["layers_1"]["moe"]
  clip = None
  if cfg.quant.learn_clip:
    from moeqjax.quant import effective_clip_ratio
    clip = effective_clip_ratio(moe["w_out_clip"])
  ours_w = np.asarray(quantize_dequantize(moe["w_out"], quant["layers_1"]["moe"]["expert_bits"],
                                          cfg.quant.spec(), clip), np.float32)
  np.testing.assert_array_equal(down, np.swapaxes(ours_w, -1, -2))

  toks = tokens()
  ours = np.asarray(MoETransformer(cfg).apply({"params": params, "quant": quant},
                                              jnp.asarray(toks)))
  theirs = logits(ct, toks)
  np.testing.assert_array_equal(theirs, logits(plain, toks))
  diff = np.abs(ours - theirs).max()
  print(f"{case}: max logit diff {diff:.2e} (|logits| <= {np.abs(ours).max():.1f})")
  assert diff <= 1e-5
