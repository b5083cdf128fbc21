"""Bad checkpoints and configs get a ConvertError naming the file, tensor or field (no torch needed)."""

import json
import pathlib

import jax
import numpy as np
import pytest

import moeqjax
from moeqjax import cli
from moeqjax.convert import ConvertError, export_hf, hf_config_to_model_config
from moeqjax.convert.safetensors_io import StreamingWriter, index_checkpoint, read_tensor
from moeqjax.model import ModelConfig, init_model

CFG = ModelConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=4, d_ff=8, num_experts=4, top_k=2, qk_norm="head", norm_topk_prob=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A qwen3_moe-layout checkpoint written by our exporter, plus its params."""
  _, params, _ = init_model(CFG, jax.random.key(0))
  out = export_hf(CFG, params, None, tmp_path_factory.mktemp("ckpt"), None, "float32")
  return out, params


def _copy_with(src: pathlib.Path, dst: pathlib.Path, edit=None, config_edit=None):
  """Rewrites a single-file checkpoint; `edit(dict)` may change, drop or add tensors."""
  dst.mkdir(parents=True)
  tensors = {n: read_tensor(i) for n, i in index_checkpoint(src).items()}
  if edit:
    edit(tensors)
  w = StreamingWriter(dst / "model.safetensors", [(n, a.shape, a.dtype) for n, a in tensors.items()])
  for n, a in tensors.items():
    w.write(n, a)
  w.close()
  config = json.loads((src / "config.json").read_text())
  if config_edit:
    config_edit(config)
  (dst / "config.json").write_text(json.dumps(config))
  return dst


def test_roundtrip_import_is_exact(checkpoint):
  path, params = checkpoint
  model, again = moeqjax.from_hf(path)
  assert model.cfg.qk_norm == "head" and model.cfg.num_experts == 4
  jax.tree.map(np.testing.assert_array_equal, params, again)


def test_missing_shard_file_is_named(checkpoint, tmp_path):
  _, params = checkpoint
  out = export_hf(CFG, params, None, tmp_path / "sharded", None, "float32",
                  max_shard_bytes=4000)
  shards = sorted(out.glob("model-*.safetensors"))
  assert len(shards) > 2
  shards[1].unlink()
  with pytest.raises(ConvertError, match=shards[1].name):
    moeqjax.from_hf(out)


def test_wrong_shape_names_tensor_and_shapes(checkpoint, tmp_path):
  name = "model.layers.1.mlp.experts.2.up_proj.weight"

  def edit(t):
    t[name] = np.zeros((9, 16), np.float32)
  bad = _copy_with(checkpoint[0], tmp_path / "bad", edit)
  with pytest.raises(ConvertError, match=r"up_proj.weight.*\[9, 16\].*\[8, 16\]"):
    moeqjax.from_hf(bad)


def test_missing_tensor_is_named(checkpoint, tmp_path):
  bad = _copy_with(checkpoint[0], tmp_path / "bad",
                   lambda t: t.pop("model.layers.0.self_attn.k_norm.weight"))
  with pytest.raises(ConvertError, match="missing.*model.layers.0.self_attn.k_norm.weight"):
    moeqjax.from_hf(bad)


def test_extra_tensor_is_named(checkpoint, tmp_path):
  def edit(t):
    t["model.layers.0.mlp.experts.4.up_proj.weight"] = np.zeros((8, 16), np.float32)
  bad = _copy_with(checkpoint[0], tmp_path / "bad", edit)
  with pytest.raises(ConvertError, match="no place for.*experts.4.up_proj"):
    moeqjax.from_hf(bad)


def test_config_with_more_experts_than_weights(checkpoint, tmp_path):
  bad = _copy_with(checkpoint[0], tmp_path / "bad",
                   config_edit=lambda c: c.update(num_experts=6))
  with pytest.raises(ConvertError, match="missing.*experts.4"):
    moeqjax.from_hf(bad)


BASE = {"model_type": "qwen3_moe", "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
        "moe_intermediate_size": 8, "num_experts": 4, "num_experts_per_tok": 2,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_act": "silu"}


@pytest.mark.parametrize("change,pattern", [
    ({"model_type": "llama"}, r"model_type='llama'.*supported: mixtral, qwen2_moe, qwen3_moe"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
    ({"sliding_window": 16, "max_position_embeddings": 128}, "sliding_window"),
    ({"mlp_only_layers": [1]}, r"mlp_only_layers.*\[1\]"),
    ({"decoder_sparse_step": 2}, r"decoder_sparse_step.*\[0\]"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"some_new_knob": 3}, "some_new_knob"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_config_errors_name_the_field(change, pattern):
  with pytest.raises(ConvertError, match=pattern):
    hf_config_to_model_config({**BASE, **change})


def test_unknown_field_can_be_allowed():
  cfg = hf_config_to_model_config({**BASE, "some_new_knob": 3}, allow_unknown=True)
  assert cfg.num_experts == 4 and cfg.qk_norm == "head"


def test_family_fields():
  olmoe = hf_config_to_model_config({**BASE, "model_type": "olmoe", "intermediate_size": 8,
                                     "clip_qkv": 2.0, "norm_topk_prob": False})
  assert (olmoe.qk_norm, olmoe.clip_qkv, olmoe.norm_topk_prob) == ("full", 2.0, False)
  mixtral = hf_config_to_model_config({**BASE, "model_type": "mixtral", "intermediate_size": 8,
                                       "num_local_experts": 4, "rope_theta": 1e6})
  assert (mixtral.qk_norm, mixtral.norm_topk_prob, mixtral.rope_theta) == ("none", True, 1e6)
  qwen2 = hf_config_to_model_config({**BASE, "model_type": "qwen2_moe",
                                     "shared_expert_intermediate_size": 12})
  assert (qwen2.shared_d_ff, qwen2.shared_expert_gate, qwen2.attn_bias) == (12, True, True)


def test_cli_reports_one_line_error(tmp_path, capsys):
  (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
  code = cli.main(["import-hf", "--hf-dir", str(tmp_path), "--out", str(tmp_path / "out")])
  assert code == 2
  err = capsys.readouterr().err
  assert "model_type='llama' is not supported" in err and "Traceback" not in err
  code = cli.main(["import-hf", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
  assert code == 2 and "config.json does not exist" in capsys.readouterr().err
