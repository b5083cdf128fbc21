"""compressed-tensors export of a Switch student: transformers decompresses every Linear (one per
expert) exactly to ours, and its logits and greedy tokens equal the fake-quant student's."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("torch", reason="needs torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="needs transformers (pip install -e .[parity])")
pytest.importorskip("compressed_tensors", reason="needs the `export` extra (compressed-tensors)")

from moeqjax.convert import export_hf_switch
from moeqjax.convert.ct_export import export_compressed_tensors, write_compressed_tensors
from moeqjax.convert.ct_pack import unpack_rows
from moeqjax.convert.runtimes import load_compressed_tensors
from moeqjax.model import QuantRules, SwitchTransformer
from moeqjax.serve import pack, switch_greedy
from moeqjax.serve.packed_source import PackedWeights

from switch_student import MIXED, ids, switch_cfg, switch_student

# name: (quant rules, config changes, expert codes, the one container every packed Linear shares)
CASES = {
    # ternary experts only: 2-bit levels, nothing else quantized
    "ternary_experts_int2": (dict(expert_code=1), {}, [[1, 1, 1, 1], [1, 1, 1, 1]], "int2"),
    # every code, int8 attention, an int3 dense FFN, an int4 lm_head (stored dequantized), untied
    "mixed_int8": (dict(expert_code=1, attn_code=8, shared_code=3, lm_head_code=4),
                   dict(num_layers=2, tie_embeddings=False), MIXED, "int8"),
    # asymmetric groups of 8: zero points stored, 3-bit levels straddling int32 words
    "asymmetric_group_int3": (dict(expert_code=1, symmetric=False, granularity="group",
                                   group_size=8), {}, [[1, 2, 3, 3], [2, 3, 1, 3]], "int3"),
}


def _torch_logits(model, enc, dec):
  import torch
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(enc, dtype=torch.long),
                 decoder_input_ids=torch.as_tensor(dec, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_switch_export_exactly(case, tmp_path):
  import transformers
  rules, changes, codes, container = CASES[case]
  cfg = switch_cfg(QuantRules(**rules), **changes)
  params, quant = switch_student(cfg, codes)
  report = export_compressed_tensors(cfg, params, quant, tmp_path / "ct")
  assert report["model_type"] == "switch_transformers"
  assert report["expert_container"] == container
  config = json.loads((tmp_path / "ct" / "config.json").read_text())
  (group,) = config["quantization_config"]["config_groups"].values()  # one scheme for all
  assert group["weights"]["num_bits"] == int(container[3:])
  assert group["weights"]["symmetric"] == rules.get("symmetric", True)
  block = cfg.encoder_sparse_layers[0]
  expert = rf"re:^encoder\.block\.{block}\.layer\.1\.mlp\.experts\.expert_3\.wo$"
  assert expert in group["targets"]
  ct = load_compressed_tensors(tmp_path / "ct")
  assert isinstance(ct, transformers.SwitchTransformersForConditionalGeneration)

  # Every parameter equals the same student written as plain float32 weights.
  export_hf_switch(cfg, params, quant, tmp_path / "plain")
  plain = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(
      tmp_path / "plain", dtype="float32").eval()
  got, want = ct.state_dict(), plain.state_dict()
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name].numpy(), w.numpy(), err_msg=name)

  student = SwitchTransformer(cfg)
  enc, dec = ids(2, 9), ids(2, 5, seed=1)
  ours = np.asarray(jax.jit(student.apply)({"params": params, "quant": quant}, enc, dec)[0])
  theirs = _torch_logits(ct, enc, dec)
  diff = np.abs(ours - theirs).max()
  print(f"{case}: max logit diff {diff:.2e} (|logits| <= {np.abs(ours).max():.1f})")
  assert diff <= 1e-5
  teacher = np.asarray(jax.jit(student.apply)({"params": params}, enc, dec)[0])
  assert np.abs(teacher - ours).max() > 1e-3  # the codes matter

  if case == "mixed_int8":
    import torch
    with torch.no_grad():
      hf_tokens = ct.generate(torch.as_tensor(enc, dtype=torch.long), max_new_tokens=4,
                              min_new_tokens=4, do_sample=False, eos_token_id=None).numpy()
    np.testing.assert_array_equal(
        switch_greedy(student, {"params": params, "quant": quant}, enc, 4), hf_tokens[:, 1:])


def test_packed_folder_exports_the_same_bytes_and_ternary_packs_at_two_bits(tmp_path):
  cfg = switch_cfg(QuantRules(expert_code=1))
  params, quant = switch_student(cfg, [[1, 1, 2, 1], [1, 2, 1, 1]])
  export_compressed_tensors(cfg, params, quant, tmp_path / "a")
  pack(cfg, params, quant, tmp_path / "packed")
  report = write_compressed_tensors(PackedWeights(tmp_path / "packed"), tmp_path / "b")
  assert report["expert_container"] == "int2"
  a, b = ((tmp_path / d / "model.safetensors").read_bytes() for d in "ab")
  assert a == b
  from safetensors.numpy import load_file
  tensors = load_file(tmp_path / "a" / "model.safetensors")
  wi = tensors["decoder.block.0.layer.2.mlp.experts.expert_0.wi.weight_packed"]
  assert wi.shape == (32, 1)  # [d_ff, 16 inputs * 2 bits / 32]
  levels = unpack_rows(wi, 2, 16)
  assert set(np.unique(levels)) <= {-1, 0, 1}  # ternary levels
