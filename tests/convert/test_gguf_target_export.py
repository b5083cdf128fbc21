"""A `--target gguf` student exports with nothing widened: file bytes = the allocator's, weights = ours."""

import jax
import numpy as np
import pytest

from moeqjax.alloc import allocation as alloc_mod
from moeqjax.alloc import gguf_target as gt
from moeqjax.convert.gguf_export import export_gguf
from moeqjax.model import QuantRules, set_expert_codes
from moeqjax.model.projection_codes import PROJECTIONS
from moeqjax.quant import quantize_dequantize
from moeqjax.train import init_router_stats

from gguf_models import gguf_cfg, read_gguf, student

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")

# [L, 3] one code per (layer, projection), rows w_gate, w_in, w_out: TQ2_0, Q4_0, Q8_0 and F16.
MIX = [[1, 4, 8], [0, 1, 4]]
_GG = {"w_gate": "ffn_gate_exps", "w_in": "ffn_up_exps", "w_out": "ffn_down_exps"}


def _student(rules=None, mix=MIX, d=256, f=512, **model):
  cfg = gguf_cfg(d=d, f=f, num_experts=2, quant=rules or QuantRules(expert_code=1,
                                                                     granularity="channel"),
                 **model)
  params, quant = student(cfg, seed=3)
  codes = gt.expand(mix, cfg.num_experts)
  return cfg, params, set_expert_codes(quant, codes), codes


def _expert_file_bytes(reader) -> dict:
  return {t.name: int(t.n_bytes) for t in reader.tensors if "_exps." in t.name}


@pytest.mark.parametrize("granularity,group_size", [("channel", 32), ("group", 256)])
def test_nothing_widened_bytes_and_weights_are_the_allocators(tmp_path, granularity, group_size):
  rules = QuantRules(expert_code=1, granularity=granularity, group_size=group_size)
  cfg, params, quant, codes = _student(rules)
  spec = cfg.quant.spec()
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf", fp_dtype="f16")
  assert report["widened"] == []
  got, reader = read_gguf(tmp_path / "m.gguf")
  on_disk = _expert_file_bytes(reader)
  accounting = gt.gguf_expert_bytes(cfg, codes)
  assert sum(on_disk.values()) == accounting["bytes"] == gt.achieved(cfg, codes)["bytes"]
  shapes = gt.projection_shapes(cfg)
  for l in range(cfg.num_layers):
    moe = params[f"layers_{l}"]["moe"]
    for p, name in enumerate(PROJECTIONS):
      gg = f"blk.{l}.{_GG[name]}.weight"
      want_type = gt.code_type(MIX[l][p], spec)
      assert got[gg][0] == want_type == accounting["types"][l][p]
      assert on_disk[gg] == gt.tensor_bytes(want_type, shapes[name], cfg.num_experts)
      w = np.asarray(moe[name], np.float32)
      ours = np.asarray(quantize_dequantize(w, codes[l, p], spec))  # the fake-quant weight
      if MIX[l][p] == 0:  # F16: the unquantized weight rounded to float16, nothing else
        ours = w.astype(np.float16).astype(np.float32)
      np.testing.assert_array_equal(got[gg][1].reshape(cfg.num_experts, *shapes[name][::-1]),
                                    np.swapaxes(ours, -1, -2), err_msg=gg)
  rows = {r["name"]: r for r in report["tensors"]}
  assert rows["blk.0.ffn_gate_exps.weight"]["note"] == ""  # TQ2_0 for ternary: no widening


def test_the_same_codes_per_expert_are_widened_and_the_report_says_so(tmp_path):
  # The per-expert form of a mixed layer (expert 0 ternary, expert 1 int8 in all projections):
  # llama.cpp's one type per tensor widens it to Q8_0, and the accounting predicts those bytes.
  cfg, params, quant, _ = _student()
  codes_LxE = np.asarray([[1, 8], [1, 4]])
  quant = set_expert_codes(quant, codes_LxE)
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  assert sorted(report["widened"]) == sorted(f"blk.{l}.{gg}.weight" for l in (0, 1)
                                             for gg in _GG.values())
  _, reader = read_gguf(tmp_path / "m.gguf")
  predicted = gt.gguf_expert_bytes(cfg, codes_LxE)
  assert sum(_expert_file_bytes(reader).values()) == predicted["bytes"]
  assert predicted["types"] == [["Q8_0"] * 3, ["Q4_0"] * 3]


def test_an_allocation_from_the_solver_exports_at_its_accounted_bytes(tmp_path):
  # d = 256, f = 384: TQ2_0 fits w_gate/w_in, not w_out (384 % 256), which the allocation states.
  cfg, params, quant, _ = _student(f=384)
  stats = jax.device_get(init_router_stats(params, cfg.num_layers))
  stats["count"] = np.asarray([[5.0, 9.0], [7.0, 2.0]], np.float32)
  stats["gate_sum"] = stats["count"] * 0.5
  a = alloc_mod.allocate("mc_moe", cfg, params, stats, 3.5, "bits", target="gguf",
                         choices=(1, 4, 8))
  assert "w_out" in a.extra["gguf_left_out"]
  report = export_gguf(cfg, params, set_expert_codes(quant, a.codes_LxE), tmp_path / "m.gguf")
  assert report["widened"] == []
  _, reader = read_gguf(tmp_path / "m.gguf")
  assert sum(_expert_file_bytes(reader).values()) == a.achieved["bytes"] <= a.budget_bytes
  types = {r["name"]: r["ggml_type"] for r in report["tensors"]}
  for l, row in a.extra["gguf_types"].items():
    for name, qtype in row.items():
      assert types[f"blk.{l}.{_GG[name]}.weight"] == qtype
