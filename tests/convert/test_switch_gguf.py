"""GGUF export of a Switch student is refused in one line, before anything is written."""

import pytest

from moeqjax.convert import ConvertError
from moeqjax.convert.gguf_export import export_gguf, write_gguf
from moeqjax.serve import pack
from moeqjax.serve.packed_source import PackedWeights

from switch_student import switch_cfg, switch_student

MESSAGE = "GGUF has no Switch Transformer MoE architecture"


def test_switch_student_gguf_export_is_refused_before_writing(tmp_path):
  cfg = switch_cfg()
  params, quant = switch_student(cfg)
  out = tmp_path / "out"
  out.mkdir()
  with pytest.raises(ConvertError, match=MESSAGE) as e:
    export_gguf(cfg, params, quant, out / "switch.gguf")
  assert "\n" not in str(e.value) and "compressed-tensors" in str(e.value)
  # ... from a packed folder too (what `moeqjax export` reads), and even with overwrite.
  pack(cfg, params, quant, tmp_path / "packed")
  with pytest.raises(ConvertError, match=MESSAGE):
    write_gguf(PackedWeights(tmp_path / "packed"), out / "switch.gguf", overwrite=True)
  assert list(out.iterdir()) == []  # no file, no temporary, no report
