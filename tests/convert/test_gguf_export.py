"""GGUF export: block encoders against gguf's decoder, and bit-exact readback of every tensor."""

import json

import numpy as np
import pytest

from moeqjax.convert import gguf_arch, gguf_blocks
from moeqjax.convert.gguf_export import export_gguf
from moeqjax.model import QuantRules
from moeqjax.quant import effective_clip_ratio, quantize_dequantize

from gguf_models import gguf_cfg, read_gguf, student

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")


@pytest.mark.parametrize("qtype", sorted(gguf_blocks.BLOCKS))
def test_block_encoder_matches_gguf_decoder(qtype):
  rng = np.random.default_rng(0)
  block, _ = gguf_blocks.BLOCKS[qtype]
  lo, hi = gguf_blocks.LEVEL_RANGE[qtype]
  levels = rng.integers(lo, hi + 1, size=(3, 2, 2 * 256))
  d = rng.standard_normal((3, 2, 512 // block)).astype(np.float16).astype(np.float32)
  m = rng.standard_normal(d.shape).astype(np.float16).astype(np.float32)
  m = m if qtype == "Q4_1" else None
  raw = gguf_blocks.encode(qtype, levels, d, m)
  back = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
  want = levels.reshape(3, 2, -1, block) * d[..., None] + (0 if m is None else m[..., None])
  np.testing.assert_array_equal(back, want.reshape(levels.shape).astype(np.float32))
  assert raw.shape[-1] == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1] * 512 // block


def test_q4_1_holds_16_levels_when_the_block_minimum_is_exact():
  from moeqjax.convert import gguf_container
  d = np.float32(np.float16(0.0123))
  levels = np.tile(np.arange(-8, 8), 4).reshape(2, 32)  # 16 levels [-8, 7]: Q4_0 holds them
  levels[1] += 1  # [-7, 8]: only offset 7 fits, and -7 d needs more fp16 bits than d has
  scale = np.full(levels.shape, d, np.float32)
  enc, skipped = gguf_container.encode_exact(levels[:1], scale[:1], start="Q4_0")
  assert enc.qtype == "Q4_0" and skipped == {}
  enc, skipped = gguf_container.encode_exact(levels[:1] + 4, scale[:1], start="Q4_0")
  assert enc.qtype == "Q4_1" and "Q4_0" in skipped  # [-4, 11]: offset 4, m = -4 d is exact
  back = gguf.quants.dequantize(enc.data, gguf.GGMLQuantizationType.Q4_1)
  np.testing.assert_array_equal(back, (levels[:1] + 4) * d)
  enc, skipped = gguf_container.encode_exact(levels[1:], scale[1:], start="Q4_0")
  assert enc.qtype == "Q8_0" and "not exact in float16" in skipped["Q4_1"]
  np.testing.assert_array_equal(
      gguf.quants.dequantize(enc.data, gguf.GGMLQuantizationType.Q8_0), levels[1:] * d)


def _interleaved_rows(heads, head_dim):
  """Row order of llama's rope layout: per head, dims i and i + A/2 become neighbours."""
  return np.array([h * head_dim + j + half * (head_dim // 2) for h in range(heads)
                   for j in range(head_dim // 2) for half in (0, 1)])


def expected_tensors(cfg, params, quant):
  """{gguf name: float32 array} of what the student's forward pass uses, in numpy [..., out, in]."""
  spec = cfg.quant.spec()
  arch = gguf_arch.arch_for(cfg)
  out = {}
  for ent in gguf_arch.tensors(cfg, arch):
    w = params
    for k in ent.path:
      w = w[k]
    codes = None
    if ent.codes:
      node = quant
      for k in ent.codes:
        node = node.get(k) if isinstance(node, dict) else None
      codes = node
    if codes is not None and np.any(np.asarray(codes) != 0):
      clip = None
      if ent.clip:
        clip = params
        for k in ent.clip:
          clip = clip[k]
        clip = effective_clip_ratio(np.asarray(clip))  # the ratio the student's forward uses
      w = quantize_dequantize(w, codes, spec, clip)
    w = np.asarray(w, np.float32)
    if ent.kind in ("kernel", "experts"):
      w = np.swapaxes(w, -1, -2)
    elif ent.kind == "gate_vector":
      w = w.reshape(-1)
    if ent.permute_heads:
      w = w[_interleaved_rows(ent.permute_heads, cfg.head_dim)]
    out[ent.name] = w
  return out


def _quant(**kw):
  base = dict(expert_code=1, granularity="channel")
  base.update(kw)
  return QuantRules(**base)


READBACK = {
    # name: (quant rules, per-layer expert codes, expected type of the expert tensors)
    "ternary_absmean_channel": (_quant(), [[1, 1, 1, 1]], "TQ2_0"),
    "ternary_twn_group256_base3": (_quant(ternary_method="twn", granularity="group",
                                          group_size=256, ternary_packing="base3"),
                                   [[1, 1, 1, 1]], "TQ1_0"),
    "ternary_group32": (_quant(granularity="group", group_size=32), [[1, 1, 1, 1]], "Q4_0"),
    "int2_channel": (_quant(), [[2, 2, 2, 2]], "Q4_0"),
    "int3_group64": (_quant(granularity="group", group_size=64), [[3, 3, 3, 3]], "Q4_0"),
    "int4_group32": (_quant(granularity="group", group_size=32), [[4, 4, 4, 4]], "Q4_0"),
    "int8_channel": (_quant(), [[8, 8, 8, 8]], "Q8_0"),
    # q - zero_point of asymmetric int4 spans up to 31 levels and the block minimum is rarely exact
    # in fp16, so Q4_1 falls through to Q8_0; asymmetric int3 (levels in [-7, 7]) fits Q4_0.
    "int4_asymmetric": (_quant(symmetric=False), [[4, 4, 4, 4]], "Q8_0"),
    "int3_asymmetric_group32": (_quant(symmetric=False, granularity="group", group_size=32),
                                [[3, 3, 3, 3]], "Q4_0"),
    "mixed_ternary_int2_int4": (_quant(), [[1, 2, 4, 1]], "Q4_0"),
    "mixed_with_int8": (_quant(), [[1, 4, 8, 2]], "Q8_0"),
    "int4_tensor_granularity": (_quant(granularity="tensor"), [[4, 2, 4, 3]], "Q4_0"),
}


@pytest.mark.parametrize("case", sorted(READBACK))
def test_readback_is_bit_exact(case, tmp_path):
  rules, codes, want_type = READBACK[case]
  cfg = gguf_cfg(num_layers=1, quant=rules)
  params, quant = student(cfg, codes)
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  got, _ = read_gguf(tmp_path / "m.gguf")
  want = expected_tensors(cfg, params, quant)
  assert sorted(got) == sorted(want)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name][1].reshape(w.shape), w, err_msg=name)
  for proj in ("gate", "up", "down"):
    assert got[f"blk.0.ffn_{proj}_exps.weight"][0] == want_type
  rows = {r["name"]: r for r in report["tensors"]}
  assert rows["blk.0.ffn_up_exps.weight"]["ggml_type"] == want_type
  on_disk = json.loads((tmp_path / "m.export_report.json").read_text())
  assert on_disk["tensors"] == report["tensors"]
  assert on_disk["file_bytes"] == (tmp_path / "m.gguf").stat().st_size


def test_readback_quantized_attention_router_head_and_learned_clip(tmp_path):
  # Quantized Q/K (llama's row permutation applies to codes and scales), a quantized router and
  # lm_head, and learned clip ratios away from 1.
  rules = _quant(expert_code=4, attn_code=1, router_code=8, lm_head_code=4, learn_clip=True)
  cfg = gguf_cfg(num_layers=1, quant=rules)
  params, quant = student(cfg, [[4, 2, 4, 3]])
  rng = np.random.default_rng(1)
  moe = params["layers_0"]["moe"]
  for k in ("w_in_clip", "w_gate_clip", "w_out_clip"):
    moe[k] = np.asarray(rng.uniform(0.6, 1.2, np.shape(moe[k])), np.float32)  # some above 1
  export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  got, _ = read_gguf(tmp_path / "m.gguf")
  want = expected_tensors(cfg, params, quant)
  for name, w in want.items():
    np.testing.assert_array_equal(got[name][1].reshape(w.shape), w, err_msg=name)
  assert got["blk.0.attn_q.weight"][0] == "TQ2_0" and got["blk.0.attn_k.weight"][0] == "TQ2_0"
  assert got["blk.0.ffn_gate_inp.weight"][0] == "Q8_0"
  assert got["output.weight"][0] == "Q4_0"
  assert got["blk.0.ffn_up_exps.weight"][0] == "Q4_0"


def test_fp_dtypes_and_all_f32_control(tmp_path):
  cfg = gguf_cfg(num_layers=1)
  params, quant = student(cfg, [[1, 1, 1, 1]])
  want = expected_tensors(cfg, params, quant)
  export_gguf(cfg, params, quant, tmp_path / "a" / "m.gguf", all_f32=True)
  got, _ = read_gguf(tmp_path / "a" / "m.gguf")
  assert {t for t, _ in got.values()} == {"F32"}
  for name, w in want.items():
    np.testing.assert_array_equal(got[name][1].reshape(w.shape), w, err_msg=name)
  export_gguf(cfg, params, quant, tmp_path / "b" / "m.gguf", fp_dtype="bf16")
  got, _ = read_gguf(tmp_path / "b" / "m.gguf")
  assert got["blk.0.attn_q.weight"][0] == "BF16" and got["token_embd.weight"][0] == "BF16"
  assert got["blk.0.attn_norm.weight"][0] == "F32"  # norms stay float32
  assert got["blk.0.ffn_gate_inp.weight"][0] == "F32"  # so does the router
  assert got["blk.0.ffn_up_exps.weight"][0] == "TQ2_0"
  emb = want["token_embd.weight"]
  bf16 = gguf.quants.dequantize(gguf.quants.quantize(emb, gguf.GGMLQuantizationType.BF16),
                                gguf.GGMLQuantizationType.BF16)
  np.testing.assert_array_equal(got["token_embd.weight"][1].reshape(emb.shape), bf16)
  export_gguf(cfg, params, quant, tmp_path / "c" / "m.gguf", fp_dtype="f16")
  got, _ = read_gguf(tmp_path / "c" / "m.gguf")
  assert got["output.weight"][0] == "F16"
  np.testing.assert_array_equal(got["output.weight"][1].reshape(want["output.weight"].shape),
                                want["output.weight"].astype(np.float16).astype(np.float32))


def test_report_counts_bytes_and_says_where_llama_cpp_widens(tmp_path):
  cfg = gguf_cfg(num_layers=2, quant=_quant())
  params, quant = student(cfg, [[1, 1, 1, 1], [1, 2, 4, 1]])
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  rows = {r["name"]: r for r in report["tensors"]}
  tern, mixed = rows["blk.0.ffn_up_exps.weight"], rows["blk.1.ffn_up_exps.weight"]
  # TQ2_0 is 2 bits + one fp16 scale per 256 weights: exactly our 2-bit packing with per-channel
  # fp16 scales at row length 256.
  assert tern["ggml_type"] == "TQ2_0" and tern["file_bytes"] == tern["moeqjax_bytes"]
  assert tern["codes"] == {"ternary": 4} and tern["note"] == ""
  assert mixed["ggml_type"] == "Q4_0" and mixed["codes"] == {"int2": 1, "int4": 1, "ternary": 2}
  assert mixed["file_bytes"] == 4 * 256 * 256 // 32 * 18 > mixed["moeqjax_bytes"]
  assert "mixed codes" in mixed["note"] and "wider than the container of ternary" in mixed["note"]
  assert "no exact 2/3-bit type" in mixed["note"]
  assert any(n.startswith("blk.1.ffn_up_exps.weight: mixed codes") for n in report["notes"])
  assert report["tensor_bytes"] == sum(r["file_bytes"] for r in report["tensors"])
  assert report["file_bytes"] > report["tensor_bytes"]  # plus header, vocab and alignment


@pytest.mark.parametrize("scale_init,codes,want_type", [("absmax", [[4, 2, 3, 2]], "Q4_0"),
                                                         ("mse", [[4, 2, 3, 4]], "Q4_0"),
                                                         ("mse", [[4, 2, 3, 8]], "Q8_0")])
def test_gptq_student_exports_gptq_integers(scale_init, codes, want_type, tmp_path):
  """A GPTQ student (latent weights + stored ratios) exports to Q4_0 / Q8_0 blocks that read back
  as GPTQ's own w_hat, including the level -qmax-1 of the full grid."""
  from moeqjax.quant import gptq as gq
  rules = _quant(granularity="group", group_size=32, scale_init=scale_init, stored_ratio=True)
  cfg = gguf_cfg(d=64, f=64, num_layers=1, quant=rules)
  params, quant = student(cfg, codes)
  spec, moe, rng = cfg.quant.spec(), params["layers_0"]["moe"], np.random.default_rng(2)
  w_hat = {}
  for name in ("w_in", "w_gate", "w_out"):
    w = np.asarray(moe[name], np.float32)
    x = rng.normal(size=(4, 256, w.shape[1])) @ (rng.normal(size=(w.shape[1],) * 2) + np.eye(w.shape[1]))
    h = 2 * np.einsum("eni,enj->eij", x, x) / x.shape[1]
    u, _, _ = gq.inverse_hessian_factor(h)
    res = gq.gptq(w, u, codes[0], spec, h=h)
    moe[name] = np.asarray(gq.exact_latent(res, codes[0], spec))
    moe[name + "_clip"] = gq.exact_ratio(res, codes[0], spec)
    w_hat[name] = np.swapaxes(np.asarray(res.w_hat), -1, -2)
    assert all(np.asarray(res.q[e]).min() == -2 ** (c - 1) for e, c in enumerate(codes[0]))
  export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  got, _ = read_gguf(tmp_path / "m.gguf")
  for name, gg in (("w_gate", "ffn_gate_exps"), ("w_in", "ffn_up_exps"), ("w_out", "ffn_down_exps")):
    typ, data = got[f"blk.0.{gg}.weight"]
    assert typ == want_type  # Q4_0 holds [-8, 7] (2^b levels); an int8 expert widens to Q8_0
    np.testing.assert_array_equal(data.reshape(w_hat[name].shape), w_hat[name], err_msg=name)
