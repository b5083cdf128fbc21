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
  # Δ against the teacher under the name every report shares (the same numbers as delta_vs_fp)
  assert (student["delta_vs_teacher"], student["delta_vs_teacher_se"]) == (
      student["delta_vs_fp"], student["delta_vs_fp_se"])
  assert "delta_vs_control" not in student  # no --control
  assert student["expert_code_bits"] == 2.0  # ternary, 2-bit packing
  # 2 layers x 4 experts x (w_in, w_gate [16,32]: 512/4 packed + 32 fp16 scales = 192 bytes each;
  # w_out [32,16]: 128 + 16 * 2 = 160 bytes)
  assert student["expert_bytes"] == 2 * 4 * (192 + 192 + 160)
  assert results["full_precision"]["expert_bytes"] == 2 * 4 * 3 * 512 * 2
  # rerunning pretrain without --resume must not overwrite the finished run silently
  assert main(["pretrain", "--workdir", str(tmp_path / "fp"), *args]) == 0  # finished: reused
  assert "pretrained 6 steps" in capsys.readouterr().out


def _allocation(path, codes_LxE):
  table = {str(l): {str(e): int(c) for e, c in enumerate(row)} for l, row in enumerate(codes_LxE)}
  path.write_text(json.dumps({"codes": table}))
  return path


def test_ptq_gptq_workdir_reads_as_a_qat_run(finished_runs, capsys):
  """ptq --method gptq (the config's scale_init="mse"): eval and pack read it (packed experts equal
  the fake-quant student's, at GPTQ's stored ratios), and qat --init-from starts from it."""
  import jax
  import numpy as np
  from moeqjax.model import expert_codes
  from moeqjax.model.packed_weights import all_experts
  from moeqjax.pipeline.export import load_student
  from moeqjax.quant import quantize_dequantize, quantize_to_ints
  from moeqjax.quant.clip import learned_ratio
  from moeqjax.serve import load_packed

  tmp_path, args = finished_runs
  codes = [[1, 2, 3, 4], [4, 1, 2, 8]]
  alloc = _allocation(tmp_path / "mixed.json", codes)
  work = tmp_path / "ptq_gptq"
  assert main(["ptq", "--workdir", str(work), "--teacher", str(tmp_path / "fp"), "--method", "gptq",
               "--allocation", str(alloc), "--calib-batches", "2", *args]) == 0
  said = capsys.readouterr().out
  report = json.loads((work / "ptq_report.json").read_text())
  err = report["calib_output_error"]
  assert err["gptq"] < err["rtn"] and f"calibration output error {err['gptq']:.4g}" in said
  assert np.sum(report["calib_tokens_per_expert"]) == 2 * 2 * 4 * 32 * 2  # L x batches x B x S x k
  cfg, params, quant = load_student(work)
  np.testing.assert_array_equal(expert_codes(quant, 2), codes)
  assert cfg.quant.stored_ratio and cfg.quant.scale_init == "mse"
  assert report["scale_init"] == "mse" and report["mse_grid_columns"] > 0
  assert main(["eval", "--workdir", str(work), "--teacher", str(tmp_path / "fp"), *args]) == 0
  student = json.loads((work / "eval.json").read_text())["student"]
  assert np.isfinite(student["bits_per_token"]) and student["expert_code_bits"] == np.mean(
      [2, 2, 3, 4, 4, 2, 2, 8])
  packed = tmp_path / "ptq_packed"
  assert main(["pack", "--workdir", str(work), "--out", str(packed), "--fp-dtype", "float32"]) == 0
  # The packed experts dequantize to the fake-quant student's experts, element for element.
  served, spec = load_packed(packed), cfg.quant.spec()
  for layer in range(2):
    for name, shape in (("w_in", (16, 32)), ("w_gate", (16, 32)), ("w_out", (32, 16))):
      bank = served.variables["packed"][f"layers_{layer}"]["moe"][name]
      path = (f"layers_{layer}", "moe", name)
      ratio = learned_ratio(params, path, spec)
      w = params[f"layers_{layer}"]["moe"][name]
      fake = quantize_dequantize(w, np.asarray(codes[layer]), spec, ratio)
      np.testing.assert_array_equal(np.asarray(all_experts(bank, shape, spec)), np.asarray(fake))
      q_int = quantize_to_ints(w, np.asarray(codes[layer]), spec, ratio)[0]
      for e, c in enumerate(codes[layer]):  # symmetric intN reaches -qmax-1 (2^b levels)
        assert c < 2 or q_int[e].min() == -2 ** (c - 1), (layer, name, e, c)
  # QAT from the GPTQ student: at step 0 the warmup learning rate is 0, so a 1-step run keeps it.
  short = [a for a in args if not a.startswith("--config.qat.steps")] + ["--config.qat.steps=1"]
  assert main(["qat", "--workdir", str(tmp_path / "q_init"), "--teacher", str(tmp_path / "fp"),
               "--init-from", str(work), *short]) == 0
  _, started, started_quant = load_student(tmp_path / "q_init")
  _, ptq_params, ptq_quant = load_student(work)
  jax.tree.map(np.testing.assert_array_equal, (started, started_quant), (ptq_params, ptq_quant))
  capsys.readouterr()
  assert main(["qat", "--workdir", str(tmp_path / "q_bad"), "--teacher", str(tmp_path / "fp"),
               "--init-from", str(tmp_path / "fp"), *short]) == 2
  assert "is a `moeqjax pretrain` run, not a `moeqjax ptq` student" in capsys.readouterr().err


def test_ptq_rtn_student_is_the_teacher_and_bad_input_is_one_line(finished_runs, capsys):
  import jax
  import numpy as np
  from moeqjax.pipeline.export import load_student
  from moeqjax.pipeline.serve import model_for_generation

  tmp_path, args = finished_runs
  work = tmp_path / "ptq_rtn"
  assert main(["ptq", "--workdir", str(work), "--teacher", str(tmp_path / "fp"), "--method", "rtn",
               *args]) == 0
  teacher = model_for_generation(None, str(tmp_path / "fp"))[1]["params"]
  jax.tree.map(np.testing.assert_array_equal, load_student(work)[1], teacher)
  capsys.readouterr()
  for extra, says in ((["--method", "gptq", "--calib-batches", "0"], "--calib-batches 0 must be"),
                      (["--method", "gptq", "--config.qat.seq_len=100000",
                        "--config.quant.scale_init=absmax"], "no calibration data"),
                      (["--method", "rtn", "--config.quant.learn_scale=True"], "no learned clip")):
    assert main(["ptq", "--workdir", str(tmp_path / "ptq_bad"), "--teacher", str(tmp_path / "fp"),
                 *args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
  with pytest.raises(SystemExit) as exit_info:
    main(["ptq", "--workdir", str(tmp_path / "ptq_bad"), "--teacher", str(tmp_path / "fp"),
          "--method", "awq", *args])
  assert exit_info.value.code == 2


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


def test_eval_against_a_same_objective_control(finished_runs, capsys):
  """`eval --control C`: a full-precision QAT run (quant.expert_code=0) of the same teacher,
  objective and schedule; eval.json gets it, and the student's Δ and routing drift against it."""
  import shutil
  tmp_path, args = finished_runs
  ctl = tmp_path / "control"
  assert main(["qat", "--workdir", str(ctl), "--teacher", str(tmp_path / "fp"), *args,
               "--config.quant.expert_code=0"]) == 0
  assert main(["eval", "--workdir", str(tmp_path / "q"), "--control", str(ctl), *args]) == 0
  results = json.loads((tmp_path / "q" / "eval.json").read_text())
  assert set(results) == {"full_precision", "control", "student"}
  control, student, fp = results["control"], results["student"], results["full_precision"]
  assert control["expert_code_bits"] == 16.0  # full precision, stored at bf16
  assert control["delta_vs_teacher"] == pytest.approx(
      control["bits_per_token"] - fp["bits_per_token"], abs=1e-9)
  assert control["bits_per_token"] != fp["bits_per_token"]  # trained: not the teacher
  assert student["delta_vs_control"] == pytest.approx(
      student["bits_per_token"] - control["bits_per_token"], abs=1e-9)
  assert student["control_topk_agree"] == pytest.approx(control["topk_agree"], abs=1e-12)
  assert student["drift_topk"] == pytest.approx(student["topk_agree"] - control["topk_agree"],
                                                abs=1e-12)
  assert student["drift_top1"] == pytest.approx(student["top1_agree"] - control["top1_agree"],
                                                abs=1e-12)
  for key in ("delta_vs_teacher_se", "delta_vs_control_se", "drift_topk_se", "drift_top1_se"):
    assert np.isfinite(student[key]), key
  # A quantized run, or a control trained with another objective, is refused in one line.
  capsys.readouterr()
  assert main(["eval", "--workdir", str(tmp_path / "q"), "--control", str(tmp_path / "q"),
               *args]) == 2
  err = capsys.readouterr().err.strip()
  assert "is not full precision (quant.expert_code=1)" in err and len(err.splitlines()) == 1, err
  other = tmp_path / "control_kd"
  shutil.copytree(ctl, other)
  record = json.loads((other / "config.json").read_text())
  record["loss"]["kd"] = record["loss"]["kd"] + 1.0
  (other / "config.json").write_text(json.dumps(record))
  assert main(["eval", "--workdir", str(tmp_path / "q"), "--control", str(other), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert "were not trained alike (loss.kd)" in err and len(err.splitlines()) == 1, err


def test_allocate_target_gguf_then_qat_trains_it_and_the_gguf_widens_nothing(finished_runs,
                                                                            capsys):
  """`allocate --target gguf` -> `qat --allocation` -> `export --format gguf`: the student holds
  the allocated per-projection codes and its GGUF stores every expert tensor at the allocated type,
  in the allocated bytes. Rows of D = 16 take no ggml block (F16 is the stated fallback for
  w_gate / w_in); w_out's rows of F = 32 take Q4_0 / Q8_0."""
  pytest.importorskip("gguf", reason="GGUF export needs the `export` extra (gguf)")
  from moeqjax.model import expert_codes
  tmp_path, args = finished_runs
  out = tmp_path / "gguf_alloc.json"
  base = ["allocate", "--workdir", str(tmp_path / "q"), "--method", "exact", "--target", "gguf",
          "--out", str(out)]
  assert main([*base, "--budget", "13", *TINY]) == 0
  printed = capsys.readouterr().out
  assert "w_gate: TQ2_0 left out (rows of 16 input weights" in printed
  record = json.loads(out.read_text())
  assert record["target"] == "gguf" and record["within_budget"]
  types = {(l, name): t for l, row in record["gguf_types"].items() for name, t in row.items()}
  assert {t for (_, n), t in types.items() if n != "w_out"} == {"F16"}
  assert {t for (_, n), t in types.items() if n == "w_out"} == {"Q4_0", "Q8_0"}  # a real mix
  # bad inputs: one line each
  assert main([*base, "--budget", "2.5", *TINY]) == 2
  assert "infeasible for --target gguf" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    main([*base[:-4], "--target", "onnx", "--budget", "13", *TINY])
  assert "invalid choice: 'onnx'" in capsys.readouterr().err
  # qat trains exactly that allocation, and the GGUF export widens nothing
  assert main(["qat", "--workdir", str(tmp_path / "qg"), "--teacher", str(tmp_path / "fp"),
               "--allocation", str(out), *args]) == 0
  config = load_config(None)
  apply_overrides(config, dict(a[len("--config."):].split("=", 1) for a in args
                               if a.startswith("--config.")))
  state = finished_state(tmp_path / "qg", state_template(config, "qat",
                                                        record["codes_LxE"]), 4)
  np.testing.assert_array_equal(expert_codes(state.quant, 2), record["codes_LxE"])
  gguf_file = tmp_path / "qg.gguf"
  assert main(["export", "--workdir", str(tmp_path / "qg"), "--format", "gguf", "--out",
               str(gguf_file), "--fp-dtype", "f16"]) == 0
  report = json.loads((tmp_path / "qg.export_report.json").read_text())
  assert report["widened"] == []
  rows = {r["name"]: r for r in report["tensors"]}
  gg = {"w_gate": "ffn_gate_exps", "w_in": "ffn_up_exps", "w_out": "ffn_down_exps"}
  assert {(l, n): rows[f"blk.{l}.{gg[n]}.weight"]["ggml_type"] for (l, n) in types} == types
  assert sum(r["file_bytes"] for r in rows.values() if "_exps" in r["name"]) == (
      record["achieved"]["bytes"])
