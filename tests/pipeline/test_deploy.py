"""The demo's deploy check: exports of a packed student loaded in llama.cpp and transformers, or an honest 'not checked'."""

import numpy as np
import pytest

from moeqjax.convert import runtimes
from moeqjax.eval.report import _deploy_section
from moeqjax.model import ModelConfig, QuantRules
from moeqjax.pipeline import deploy
from moeqjax.serve import pack

from conftest import numpy_student


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
  """A packed 1-layer mixed student (d = 64, so its ternary experts fall back to Q4_0)."""
  cfg = ModelConfig(vocab_size=256, d_model=64, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=16, d_ff=64, num_experts=4, top_k=2, max_seq_len=64,
                    quant=QuantRules(expert_code=1, granularity="channel"))
  params, quant = numpy_student(cfg, [[1, 2, 4, 1]], seed=3, embed_scale=40.0)
  folder = tmp_path_factory.mktemp("deploy") / "packed"
  pack(cfg, params, quant, folder, fp_dtype="float32")
  return folder


PROMPT = list(b"def main():\n  return x + 1\n")


def test_exports_load_and_match_in_both_runtimes(packed, tmp_path):
  pytest.importorskip("xllamacpp", reason="needs the `export` extra (xllamacpp)")
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra")
  rows = deploy.deploy_packed(tmp_path, {"s": packed}, PROMPT)["s"]
  g, c = rows["gguf"], rows["compressed_tensors"]
  assert g["file_bytes"] == (tmp_path / "deploy" / "s" / "model.gguf").stat().st_size
  assert g["ggml_types"] == ["Q4_0"]
  assert (g["loaded"], g["matched"], g["greedy_tokens_equal"]) == (True, True, deploy.NEW_TOKENS)
  assert c["file_bytes"] == (tmp_path / "deploy" / "s" / "compressed-tensors" /
                             "model.safetensors").stat().st_size
  assert c["loaded"] and c["matched"] and c["max_abs_logit_diff"] <= deploy.CT_LOGIT_TOL
  assert c["expert_container"] == "int4"
  table = "\n".join(_deploy_section({"s": rows}))
  assert table.count("| yes | yes |") == 2


def test_without_the_runtime_packages_the_rows_say_not_checked(packed, tmp_path, monkeypatch):
  monkeypatch.setattr(runtimes, "missing", lambda modules: list(modules))  # none installed
  rows = deploy.deploy_packed(tmp_path, {"s": packed}, PROMPT)["s"]
  g, c = rows["gguf"], rows["compressed_tensors"]
  assert g["file"] is None and g["note"] == ("not written: the GGUF writer needs the gguf package "
                                             "(pip install gguf)")
  assert not (tmp_path / "deploy" / "s" / "model.gguf").exists()
  # The compressed-tensors writer needs no extra: the folder is written, the check is not run.
  assert c["file_bytes"] == (tmp_path / "deploy" / "s" / "compressed-tensors" /
                             "model.safetensors").stat().st_size
  assert (c["loaded"], c["matched"]) == (None, None)
  assert c["note"].startswith("not checked: install the export extra")
  assert "torch, transformers, compressed_tensors" in c["note"]
  table = "\n".join(_deploy_section({"s": rows}))
  assert "| `s` | GGUF (llama.cpp) | - | - | - | not written" in table


def test_without_llama_cpp_the_gguf_row_says_which_platforms_have_it(packed, tmp_path,
                                                                     monkeypatch):
  missing = runtimes.missing
  monkeypatch.setattr(runtimes, "missing",
                      lambda modules: [m for m in modules if m == "xllamacpp"] or missing(modules))
  g = deploy.deploy_packed(tmp_path, {"s": packed}, PROMPT)["s"]["gguf"]
  assert g["file_bytes"] == (tmp_path / "deploy" / "s" / "model.gguf").stat().st_size
  assert (g["loaded"], g["matched"]) == (None, None)
  assert g["note"].startswith("not checked: llama.cpp (xllamacpp) is not installed; it ships "
                              "wheels for Linux")
  # Its ternary and int2 experts share Q4_0 with the int4 one (one type per llama.cpp tensor): all
  # three expert tensors are widened, each 4 experts x 64 rows x 2 blocks of 18 bytes.
  assert g["widened"] == [f"blk.0.{t}.weight" for t in ("ffn_gate_exps", "ffn_up_exps",
                                                        "ffn_down_exps")]
  assert g["expert_bytes"] == 3 * 4 * 64 * 2 * 18
  # ours: per tensor, 64 x 64 weights at 2 + 2 + 4 + 2 bits, plus 4 x 64 fp16 scales
  assert g["expert_bytes_packed"] == 3 * (64 * 64 * (2 + 2 + 4 + 2) // 8 + 4 * 64 * 2)
  table = "\n".join(_deploy_section({"s": {"gguf": g}}))
  assert "(pip install xllamacpp==2026.10.11549) | 27,648 (16,896) | 3 |" in table


def test_switch_demo_deploy_check_uses_the_same_check_and_bound(tmp_path):
  """The Switch demo's compressed-tensors check: the shared row and relative bound, on a packed
  ternary Switch student and its greedy span filling."""
  pytest.importorskip("compressed_tensors", reason="needs the `export` extra")
  from moeqjax.model import QuantRules as Rules
  from moeqjax.pipeline import switch_demo
  from moeqjax.serve import load_packed, switch_greedy
  from switch_student import ids, switch_cfg, switch_student
  cfg = switch_cfg(Rules(expert_code=1))
  params, quant = switch_student(cfg, codes=[[1] * 4, [1] * 4])
  folder = tmp_path / "packed" / switch_demo.SERVED
  pack(cfg, params, quant, folder, fp_dtype="float32")
  served = load_packed(folder)
  enc = ids(1, 9)
  tokens = switch_greedy(served.model, served.variables, enc, 6)[0]
  serving = {"folder": str(folder), "encoder_ids": enc[0].tolist(), "tokens": tokens.tolist()}
  row = switch_demo.deploy_check(tmp_path, serving, None)[switch_demo.SERVED]["compressed_tensors"]
  assert row["file_bytes"] == (tmp_path / "deploy" / switch_demo.SERVED / "compressed-tensors" /
                               "model.safetensors").stat().st_size
  assert row["loaded"] and row["matched"] and row["expert_container"] == "int2"
  dec = np.asarray([[cfg.decoder_start_token_id, *tokens[:-1].tolist()]])
  ours = np.asarray(served.model.apply(served.variables, enc, dec)[0])
  bound = deploy.CT_LOGIT_TOL * max(1.0, float(np.abs(ours).max()))
  assert row["logit_bound"] == pytest.approx(bound, rel=1e-6)
  assert row["max_abs_logit_diff"] <= bound
  assert "x max |logit|" in row["note"]
