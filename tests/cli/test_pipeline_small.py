"""pretrain -> qat -> eval through the CLI on a tiny config and a small text file."""

import json

import numpy as np
import pytest

from moeqjax.cli import main
from moeqjax.pipeline.config import apply_overrides, load_config
from moeqjax.pipeline.workdirs import finished_state, state_template

TINY = ["--config.model.d_model=16", "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
        "--config.model.head_dim=8", "--config.model.d_ff=32", "--config.model.num_experts=4",
        "--config.eval.num_windows=4", "--config.eval.seq_len=32", "--config.eval.batch_size=4"]
PHASES = ["--config.pretrain.steps=6", "--config.pretrain.warmup_steps=1",
          "--config.pretrain.batch_size=4", "--config.pretrain.seq_len=32",
          "--config.qat.steps=4", "--config.qat.warmup_steps=1", "--config.qat.batch_size=4",
          "--config.qat.seq_len=32"]


@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
  """A finished pretrain (fp/) and QAT (q/) workdir, made through the CLI once for this module."""
  tmp_path = tmp_path_factory.mktemp("runs")
  data = tmp_path / "corpus.txt"
  data.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n"
                          for i in range(400)))
  args = ["--data", str(data), *TINY, *PHASES]
  assert main(["pretrain", "--workdir", str(tmp_path / "fp"), *args]) == 0
  assert main(["qat", "--workdir", str(tmp_path / "q"), "--teacher", str(tmp_path / "fp"),
               *args]) == 0
  return tmp_path, args


def test_pretrain_qat_eval(finished_runs, capsys):
  tmp_path, args = finished_runs
  assert main(["eval", "--workdir", str(tmp_path / "q"), "--teacher", str(tmp_path / "fp"),
               *args]) == 0
  results = json.loads((tmp_path / "q" / "eval.json").read_text())
  assert set(results) == {"full_precision", "student"}
  student = results["student"]
  assert 0.0 <= student["topk_agree"] <= 1.0
  assert student["expert_code_bits"] == 2.0  # ternary, 2-bit packing
  # 2 layers x 4 experts x (w_in, w_gate [16,32]: 512/4 packed + 32 fp16 scales = 192 bytes each;
  # w_out [32,16]: 128 + 16 * 2 = 160 bytes)
  assert student["expert_bytes"] == 2 * 4 * (192 + 192 + 160)
  assert results["full_precision"]["expert_bytes"] == 2 * 4 * 3 * 512 * 2
  # rerunning pretrain without --resume must not overwrite the finished run silently
  assert main(["pretrain", "--workdir", str(tmp_path / "fp"), *args]) == 0  # finished: reused
  assert "pretrained 6 steps" in capsys.readouterr().out


def test_qat_learn_clip_from_a_teacher_without_ratios(finished_runs):
  """Issue 11: `qat --config.quant.learn_clip=True` from a teacher that has no `*_clip` params failed
  (restoring the teacher into a template with them, or a ScopeParamNotFoundError): the QAT start
  creates them at their initial value and trains them."""
  tmp_path, args = finished_runs
  clip_args = [*args, "--config.quant.learn_clip=True", "--config.quant.expert_code=2"]
  assert main(["qat", "--workdir", str(tmp_path / "qc"), "--teacher", str(tmp_path / "fp"),
               *clip_args]) == 0
  config = load_config(None)
  apply_overrides(config, dict(a[len("--config."):].split("=", 1) for a in clip_args
                               if a.startswith("--config.")))
  state = finished_state(tmp_path / "qc", state_template(config, "qat"), 4)
  ratios = np.asarray(state.params["layers_0"]["moe"]["w_in_clip"])
  assert ratios.shape == (4, 1, 32) and 0.05 <= ratios.min() and ratios.max() <= 1.0
  assert np.any(ratios != 1.0)
  assert "w_in_clip" not in state.teacher_params["layers_0"]["moe"]
