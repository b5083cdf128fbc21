"""Export from a packed checkpoint writes exactly what export from the student writes: nothing is re-quantized."""

import json

import numpy as np
import pytest

from moeqjax.convert.ct_export import export_compressed_tensors, write_compressed_tensors
from moeqjax.convert.gguf_export import export_gguf, write_gguf
from moeqjax.convert.hf_export import export_hf, write_hf
from moeqjax.convert.safetensors_io import read_header, read_tensor
from moeqjax.model import QuantRules
from moeqjax.serve import pack
from moeqjax.serve.packed_source import PackedWeights

from conftest import numpy_student
from gguf_models import gguf_cfg

gguf = pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")

# Symmetric mixed codes with learned clip ratios and quantized attention / router / lm_head; and
# asymmetric group scales with ternary experts beside intN ones (ternary stores no zero point).
STUDENTS = {
    "symmetric_mixed_clip": (dict(expert_code=4, granularity="channel", learn_clip=True,
                                  attn_code=1, router_code=8, lm_head_code=4), [[1, 2, 4, 1]]),
    "asymmetric_group_mixed": (dict(expert_code=4, granularity="group", group_size=32,
                                    symmetric=False, attn_code=3), [[1, 3, 2, 1]]),
}


@pytest.fixture(scope="module", params=sorted(STUDENTS))
def packed_student(request, tmp_path_factory):
  """(cfg, params, quant, packed folder) of a 1-layer student packed with float32 unquantized weights."""
  rules, codes = STUDENTS[request.param]
  cfg = gguf_cfg(num_layers=1, quant=QuantRules(**rules))
  params, quant = numpy_student(cfg, codes)
  folder = tmp_path_factory.mktemp(request.param) / "packed"
  pack(cfg, params, quant, folder, fp_dtype="float32")
  return cfg, params, quant, folder


def _gguf_tensors(path):
  reader = gguf.GGUFReader(str(path))
  return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).tobytes())) for t in reader.tensors}


def test_gguf_from_packed_is_byte_identical(packed_student, tmp_path):
  cfg, params, quant, folder = packed_student
  ours = export_gguf(cfg, params, quant, tmp_path / "a" / "m.gguf")
  theirs = write_gguf(PackedWeights(folder), tmp_path / "b" / "m.gguf")
  a, b = _gguf_tensors(tmp_path / "a" / "m.gguf"), _gguf_tensors(tmp_path / "b" / "m.gguf")
  assert sorted(a) == sorted(b)
  for name in a:
    assert a[name] == b[name], name
  assert {t for t, _ in a.values()} - {"F32"}  # quantized tensors were compared
  assert ours["tensors"] == theirs["tensors"]
  assert (tmp_path / "a" / "m.gguf").read_bytes() == (tmp_path / "b" / "m.gguf").read_bytes()


def _safetensors(folder):
  header = read_header(folder / "model.safetensors")
  return {name: read_tensor(info) for name, info in header.items()}


def test_compressed_tensors_and_hf_from_packed_are_identical(packed_student, tmp_path):
  cfg, params, quant, folder = packed_student
  weights = PackedWeights(folder)
  ours = export_compressed_tensors(cfg, params, quant, tmp_path / "a", dtype="float32")
  theirs = write_compressed_tensors(weights, tmp_path / "b", dtype="float32")
  a, b = _safetensors(tmp_path / "a"), _safetensors(tmp_path / "b")
  assert sorted(a) == sorted(b) and any(n.endswith("weight_packed") for n in a)
  for name in a:
    assert a[name].dtype == b[name].dtype, name
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  assert ours["tensors"] == theirs["tensors"]
  assert ((tmp_path / "a" / "config.json").read_text()
          == (tmp_path / "b" / "config.json").read_text())
  export_hf(cfg, params, quant, tmp_path / "hf_a", dtype="float32")
  write_hf(weights, tmp_path / "hf_b", dtype="float32")
  a, b = _safetensors(tmp_path / "hf_a"), _safetensors(tmp_path / "hf_b")
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_packed_weights_give_the_stored_ints_not_a_requantization(packed_student):
  # The packed scales are what a re-derivation from the dequantized weights would not give back
  # under clipping; the integer forms read from the checkpoint equal quantize_to_ints exactly.
  from moeqjax.convert.student_weights import ParamWeights
  cfg, params, quant, folder = packed_student
  ours, theirs = ParamWeights(cfg, params, quant), PackedWeights(folder)
  for path in (("layers_0", "moe", "w_in"), ("layers_0", "moe", "w_out"),
               ("layers_0", "attn", "q_proj", "kernel")):
    a, b = ours.ints(path), theirs.ints(path)
    np.testing.assert_array_equal(ours.codes(path), theirs.codes(path))
    for x, y in ((a.q, b.q), (a.scales, b.scales), (a.zero_points, b.zero_points)):
      assert (x is None) == (y is None)
      if x is not None:
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg="/".join(path))


def _packed_bytes(manifest) -> dict:
  """{param path: bytes the packed checkpoint stores for it} (values, scales, zero points)."""
  out = {}
  for rec in manifest["tensors"].values():
    out[rec["param"]] = out.get(rec["param"], 0) + rec["nbytes"]
  return out


def _check_moeqjax_bytes(rows, cfg, quant, manifest, source_of):
  """Each quantized row's moeqjax bytes are the packed checkpoint's, and the experts' per-layer sum
  is the memory accounting's."""
  from moeqjax.eval.memory_report import expert_shapes
  from moeqjax.quant import expert_bytes
  stored = _packed_bytes(manifest)
  quantized = [r for r in rows if "fp" not in r["codes"]]
  assert len(quantized) >= 7  # 3 expert tensors + 4 attention kernels
  for r in quantized:
    assert r["moeqjax_bytes"] == stored[source_of(r)], r["name"]
  codes = [quant[f"layers_{i}"]["moe"]["expert_bits"] for i in range(cfg.num_layers)]
  accounted = expert_bytes(expert_shapes(cfg), np.asarray(codes), cfg.quant.spec())
  experts = [r for r in quantized if "exps" in r["name"] or ".experts." in r["name"]]
  assert len(experts) == 3
  assert sum(r["moeqjax_bytes"] for r in experts) == accounted["bytes_per_layer"][0]


def test_report_bytes_equal_the_accounting_and_the_files(packed_student, tmp_path):
  import fnmatch
  from moeqjax.convert import layout
  from moeqjax.convert.hf_config import family_of, model_config_to_hf_config
  cfg, params, quant, folder = packed_student
  manifest = json.loads((folder / "manifest.json").read_text())
  report = export_gguf(cfg, params, quant, tmp_path / "m.gguf")
  _check_moeqjax_bytes(report["tensors"], cfg, quant, manifest, lambda r: r["source"])
  nbytes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
  for r in report["tensors"]:
    assert r["file_bytes"] == nbytes[r["name"]], r["name"]
  report = export_compressed_tensors(cfg, params, quant, tmp_path / "ct")
  fam = family_of(model_config_to_hf_config(cfg, None, None, "bfloat16"))
  param_of = {}  # HF module name (experts as "*") -> our param path
  for ent in layout.entries(cfg, fam):
    name = ent.hf_name[:-len(".weight")] if ent.hf_name.endswith(".weight") else ent.hf_name
    param_of[name.replace(f".experts.{ent.expert}.", ".experts.*.")] = "/".join(ent.path)
  _check_moeqjax_bytes(report["tensors"], cfg, quant, manifest, lambda r: param_of[r["name"]])
  header = read_header(tmp_path / "ct" / "model.safetensors")
  for r in report["tensors"]:
    names = [n for n in header if n == r["name"] or fnmatch.fnmatchcase(n, r["name"] + ".*")]
    assert names and r["file_bytes"] == sum(header[n].nbytes for n in names), r["name"]
  assert report["tensor_bytes"] == sum(info.nbytes for info in header.values())
