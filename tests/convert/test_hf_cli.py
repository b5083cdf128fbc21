"""The CLI: `import-hf` writes a teacher folder, `export` writes HF weights from it, `plan` prints a memory plan."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from moeqjax import cli


def test_plan_prints_counts_for_presets(capsys):
  assert cli.main(["plan", "--config", "configs/olmoe_1b_7b.py"]) == 0
  out = capsys.readouterr().out
  lines = {}
  for line in out.splitlines():
    if line.strip():
      lines.setdefault(line.split()[0], line)  # first "total" is the parameter total
  assert "6.919 B" in lines["total"]  # OLMoE-1B-7B: 6.9B parameters
  assert "1.282 B" in lines["active/tok"]  # ... 1.3B active
  assert "quantized (expert code 2)" in out and "teacher+student+grad+Adam" in out


def test_plan_counts_match_real_params():
  import jax
  from moeqjax.pipeline import config as config_io
  from moeqjax.convert.plan import plan
  from moeqjax.model import init_model
  cfg = config_io.model_config(config_io.load_config("configs/tiny.py"))
  p = plan(cfg, 2, 16)
  real = sum(x.size for x in jax.tree.leaves(init_model(cfg, jax.random.key(0))[1]))
  assert p["params_total"] == real
  assert p["quantized_bytes"] < p["bf16_bytes"]


def test_import_then_export_cli(tmp_path, capsys):
  pytest.importorskip("torch", reason="needs torch to build the HF model")
  transformers = pytest.importorskip("transformers", reason="needs transformers")
  from hf_models import build_hf_model, hf_logits_and_routing, save_hf_model, tokens
  import moeqjax
  src = save_hf_model(build_hf_model("olmoe", 4, 2, True, clip_qkv=0.8), tmp_path / "src")
  assert cli.main(["import-hf", "--hf-dir", str(src), "--out", str(tmp_path / "imp")]) == 0
  imp = tmp_path / "imp"
  for name in ("config.py", "hf_config.json", "hf_import.json", "params"):
    assert (imp / name).exists(), name
  # the written config.py is a valid experiment config whose model section is the import
  from moeqjax.pipeline import config as config_io
  from moeqjax.pipeline.import_hf import load_imported_params
  cfg = config_io.model_config(config_io.load_config(imp / "config.py"))
  assert cfg.qk_norm == "full" and cfg.clip_qkv == 0.8 and cfg.num_experts == 4
  params = load_imported_params(imp, cfg)  # what `qat --teacher imp` starts from
  _, direct = moeqjax.from_hf(src)
  import jax
  jax.tree.map(np.testing.assert_array_equal, params, direct)
  assert cli.main(["export", "--workdir", str(imp), "--format", "hf", "--out",
                   str(tmp_path / "exp"), "--dtype", "float32"]) == 0
  cfg_out = json.loads((tmp_path / "exp" / "config.json").read_text())
  assert cfg_out["model_type"] == "olmoe" and cfg_out["clip_qkv"] == 0.8
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exp",
                                                         attn_implementation="eager").eval()
  toks = tokens(1, 10)
  theirs, _ = hf_logits_and_routing(hf, toks)
  model = moeqjax.convert.hf_import.MoETransformer(cfg)
  ours = np.asarray(model.apply({"params": params}, jnp.asarray(toks)))
  assert np.abs(ours - theirs).max() <= 1e-4
