"""`--requantize-mixed`: a mixed-code expert tensor stored at one narrower ggml type, its error reported."""

import numpy as np
import pytest

from moeqjax.cli import main
from moeqjax.convert import ConvertError
from moeqjax.convert.gguf_export import export_gguf
from moeqjax.model import QuantRules

from conftest import numpy_student
from gguf_models import gguf_cfg, read_gguf
from test_gguf_export import expected_tensors

pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")

CODES = [[1, 4, 1, 8]]  # ternary, int4, ternary, int8: stored exactly only at Q8_0


@pytest.fixture(scope="module")
def mixed():
  cfg = gguf_cfg(num_layers=1, quant=QuantRules(expert_code=1, granularity="channel"))
  params, quant = numpy_student(cfg, CODES)
  return cfg, params, quant, expected_tensors(cfg, params, quant)


@pytest.mark.parametrize("target,redone", [("Q4_0", [3]), ("TQ2_0", [1, 3])])
def test_requantized_tensor_and_its_reported_error(mixed, tmp_path, target, redone):
  cfg, params, quant, want = mixed
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf", requantize_mixed=target)
  got, _ = read_gguf(tmp_path / "m.gguf")
  rows = {r["name"]: r for r in report["tensors"]}
  for proj in ("gate", "up", "down"):
    name = f"blk.0.ffn_{proj}_exps.weight"
    kind, back = got[name]
    w = want[name]
    back = back.reshape(w.shape)
    assert kind == target and rows[name]["ggml_type"] == target
    req = rows[name]["requantized"]
    assert req["from"] == "Q8_0" and req["experts"] == redone
    for e in range(4):  # experts the target holds exactly keep their own levels and scales
      if e not in redone:
        np.testing.assert_array_equal(back[e], w[e], err_msg=f"{name} expert {e}")
    assert not np.array_equal(back[redone[-1]], w[redone[-1]])
    rel = np.linalg.norm(back - w) / np.linalg.norm(w)  # the oracle: the file against the student
    assert req["rel_error"] == pytest.approx(rel, rel=1e-5) and rel > 0
    assert f"relative error {rel:.3g}" in rows[name]["note"]
  assert rows["blk.0.attn_q.weight"]["ggml_type"] == "F32"  # only mixed expert tensors change
  assert report["requantize_mixed"] == target


def test_off_by_default_and_bad_requests(mixed, tmp_path, capsys):
  cfg, params, quant, want = mixed
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  row = next(r for r in report["tensors"] if r["name"] == "blk.0.ffn_up_exps.weight")
  assert row["ggml_type"] == "Q8_0" and "requantized" not in row
  got, _ = read_gguf(tmp_path / "m.gguf")
  np.testing.assert_array_equal(got[row["name"]][1].reshape(want[row["name"]].shape),
                                want[row["name"]])
  with pytest.raises(ConvertError, match="--requantize-mixed Q2_K: choose one of TQ2_0, TQ1_0, Q4_0"):
    export_gguf(cfg, params, quant, tmp_path / "x.gguf", requantize_mixed="Q2_K")
  small = gguf_cfg(d=64, f=64, num_layers=1, quant=cfg.quant)
  p, q = numpy_student(small, CODES)
  with pytest.raises(ConvertError, match="rows of 64 weights, not a multiple of its block of 256"):
    export_gguf(small, p, q, tmp_path / "y.gguf", requantize_mixed="TQ2_0")
  assert not any(tmp_path.glob("[xy].gguf*"))  # nothing left behind, not even a partial file
