"""`moeqjax demo` on a byte model whose rows fit ggml blocks: the qat_gguf variant beside qat_mixed."""

import json

import ml_collections
import numpy as np
import pytest

from moeqjax.cli import main
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.qat import compiled_qat_step

# D = F = 32: every projection's rows take Q4_0 / Q8_0 blocks of 32 (TQ's 256 do not fit, so ternary
# is left out), so qat_mixed's GGUF export is written and qat_gguf runs. Few steps: each phase's
# compile dominates on a 2-core CPU.
SMALL = ["--config.model.d_model=32", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
         "--config.model.head_dim=16", "--config.model.d_ff=32", "--config.model.num_experts=4",
         "--config.pretrain.steps=4", "--config.pretrain.warmup_steps=1",
         "--config.pretrain.batch_size=4", "--config.pretrain.seq_len=32",
         "--config.pretrain.log_every=1", "--config.qat.steps=1", "--config.qat.warmup_steps=1",
         "--config.qat.batch_size=2", "--config.qat.seq_len=16", "--config.qat.log_every=1",
         "--config.eval.num_windows=2", "--config.eval.seq_len=16", "--config.eval.batch_size=2"]


def test_demo_gguf_variant_holds_its_allocation_in_qat_mixeds_gguf_bytes(tmp_path):
  gguf = pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")
  from moeqjax.alloc.gguf_target import gguf_expert_bytes
  from moeqjax.model.projection_codes import PROJECTIONS
  data = tmp_path / "corpus.txt"
  data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                          for i in range(300)))
  work = tmp_path / "demo"
  assert main(["demo", "--data", str(data), "--workdir", str(work), *SMALL]) == 0
  metrics = json.loads((work / "metrics.json").read_text())
  assert "qat_gguf" in metrics["variants"] and "skipped" not in metrics
  config = ml_collections.ConfigDict(json.loads((work / "qat_gguf" / "config.json").read_text()))
  cfg = config_io.model_config(config)
  # Its budget is qat_mixed's GGUF expert bytes after widening, computed here independently.
  mixed_codes = metrics["allocations"]["qat_mixed"]["codes_LxE"]
  mixed_gguf = gguf_expert_bytes(cfg, mixed_codes)["bytes"]
  record = metrics["allocations"]["qat_gguf"]
  assert record == json.loads((work / "qat_gguf_allocation.json").read_text())
  assert record["target"] == "gguf" and record["method"] == "exact"
  assert record["budget"] == {"value": mixed_gguf, "unit": "bytes", "bytes": mixed_gguf}
  assert record["budget_from"]["gguf_bytes"] == mixed_gguf
  assert record["achieved"]["bytes"] == gguf_expert_bytes(cfg, record["codes_LxE"])["bytes"]
  assert record["achieved"]["bytes"] <= mixed_gguf
  assert set(record["gguf_left_out"]) == set(PROJECTIONS)  # TQ2_0 for every projection
  # The student trained those per-projection codes; it is evaluated like the other QAT rows.
  assert config.expert_codes == record["codes_LxE"] and np.shape(record["codes_LxE"]) == (2, 3, 4)
  control, r = metrics["variants"]["fp_continued"], metrics["variants"]["qat_gguf"]
  assert r["delta_vs_control"] == pytest.approx(
      r["bits_per_token"] - control["bits_per_token"], abs=1e-9)
  assert r["drift_topk"] == pytest.approx(r["topk_agree"] - control["topk_agree"], abs=1e-12)
  assert np.isfinite(r["delta_vs_control_se"]) and np.isfinite(r["drift_topk_se"])
  report = (work / "report.md").read_text()
  assert f"`qat_gguf`'s budget is the {mixed_gguf:,} GGUF expert bytes of `qat_mixed`" in report
  assert ("left out as not exact here: TQ2_0 for w_gate, w_in, w_out (rows of 32 input weights "
          "are not a multiple of its block of 256)") in report
  assert (work / "plots" / "bit_map_qat_gguf.png").stat().st_size > 0
  # Deploy: qat_gguf's GGUF widens nothing and stores its experts in exactly the allocated bytes
  # and types; qat_mixed's export is widened to the bytes that were qat_gguf's budget.
  deploy = metrics["deploy"]
  g, m = deploy["qat_gguf"]["gguf"], deploy["qat_mixed"]["gguf"]
  assert g["widened"] == [] and m["expert_bytes"] == mixed_gguf
  for name, row in (("qat_gguf", g), ("qat_mixed", m)):  # beside our packed bytes of them
    assert row["expert_bytes_packed"] == metrics["variants"][name]["expert_bytes"]
  assert m["widened"] == json.loads((work / "deploy" / "qat_mixed" /
                                     "model.export_report.json").read_text())["widened"]
  reader = gguf.GGUFReader(work / "deploy" / "qat_gguf" / "model.gguf")
  experts = {t.name: t for t in reader.tensors if "_exps" in t.name}
  assert sum(int(t.n_bytes) for t in experts.values()) == g["expert_bytes"] == (
      record["achieved"]["bytes"])
  names = {"w_gate": "ffn_gate_exps", "w_in": "ffn_up_exps", "w_out": "ffn_down_exps"}
  assert {(int(l), p): experts[f"blk.{l}.{names[p]}.weight"].tensor_type.name
          for l, row in record["gguf_types"].items() for p in row} == {
      (int(l), p): t for l, row in record["gguf_types"].items() for p, t in row.items()}
  if g["loaded"] is not None:  # llama.cpp (xllamacpp) installed: it ran the file
    assert g["loaded"] and 0 <= g["greedy_tokens_equal"] <= 16
    assert f"greedy = ours for {g['greedy_tokens_equal']} of 16" in g["note"]
  assert "| `qat_gguf` | GGUF (llama.cpp) |" in report and "tensors widened" in report
  # Two compiled QAT steps: the [L, E] codes of the uniform and per-expert variants, and qat_gguf's
  # [L, 3, E] (a different traced shape).
  _, optim = config_io.phase_configs(config.qat, "qat")
  step = compiled_qat_step(cfg, optim, config_io.loss_weights(config))
  assert step._cache_size() == 2
