"""`moeqjax study` on a tiny Switch config, end to end through the CLI: the structure of study.json
and study.md, and numerical oracles (equal bytes, Lambda, the PTQ row of uniform, the paired Δs)."""

import dataclasses
import json
import pathlib
import textwrap

import jax
import numpy as np
import pytest

from moeqjax.alloc.allocation import achieved, bytes_table
from moeqjax.cli import main
from moeqjax.data.seq2seq import span_corruption_batch, t5_sentinel_ids
from moeqjax.eval import evaluate_seq2seq
from moeqjax.model import default_quant, init_ratios, set_expert_codes, without_ratios
from moeqjax.pipeline.config import load_config, switch_config
from moeqjax.pipeline.study import slice_corpus
from moeqjax.pipeline.switch_phases import allocation_view, state_template
from moeqjax.train import Checkpointer

PRE, FT, QAT = 12, 4, 4
METHODS = ("paper_combined", "frequency", "random", "uniform")
PTQ = ("rtn", "gptq")  # configs/switch_study.py's post-training rows
REPO = pathlib.Path(__file__).resolve().parents[2]
# configs/switch_study.py at a test's size: 1+1 sparse layers of 4 experts, 48-byte windows. The
# QAT objective is the task loss alone (+ lb, z) and the fine-tune has QAT's steps and learning
# rate, so that the fine-tunes, the controls and the cells share one compiled step (the test's time
# is mostly compiles); the structure and the oracles do not depend on the objective.
MICRO = textwrap.dedent(f'''
    import importlib.util

    def get_config():
      spec = importlib.util.spec_from_file_location(
          "switch_study", {str(REPO / "configs" / "switch_study.py")!r})
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      c = module.get_config()
      c.model.update(dict(d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1,
                          num_decoder_layers=1, num_sparse_encoder_layers=1,
                          num_sparse_decoder_layers=1, num_experts=4, expert_capacity=10))
      c.seq2seq.window = 48
      c.pretrain.update(dict(steps={PRE}, batch_size=4, seq_len=48, warmup_steps=2))
      c.qat.update(dict(steps=99, batch_size=4, seq_len=48, warmup_steps=1))
      c.eval.update(dict(num_batches=2, batch_size=8))
      c.loss.update(dict(rec=0.0, kd=0.0, value=0.0, struct=0.0))
      c.study.update(dict(methods={METHODS!r}, seeds=1, finetune_steps=99,
                          finetune_learning_rate=c.qat.learning_rate))
      c.study.quick.update(dict(seeds=2, finetune_steps={FT}, qat_steps={QAT}))
      return c
    ''')


@pytest.fixture(scope="module")
def study(tmp_path_factory):
  w = tmp_path_factory.mktemp("switch_study")
  (w / "micro.py").write_text(MICRO)
  assert main(["study", "--config", str(w / "micro.py"), "--workdir", str(w / "s"), "--quick"]) == 0
  return w, json.loads((w / "s" / "study.json").read_text()), load_config(w / "micro.py")


def _params(config, folder, phase, steps):
  ckpt = Checkpointer(folder / "ckpt", every=0)
  try:
    assert ckpt.latest_step() == steps
    return without_ratios(ckpt.restore(state_template(config, phase), steps,
                                       parts=("params",)).params)
  finally:
    ckpt.close()


def test_structure(study):
  w, data, _ = study
  st = data["meta"]["settings"]
  assert st["seeds"] == 2 and st["qat_steps"] == QAT and st["finetune_steps"] == FT
  assert sorted(data["cells"]) == sorted(f"joint|{m}|2.5|{s}" for m in METHODS for s in (0, 1))
  # one RTN and one GPTQ row per arm, random one per seed (its order changes with the seed)
  assert sorted(data["ptq_cells"]) == sorted([f"{p}|{m}|2.5|0" for m in METHODS for p in PTQ]
                                             + [f"{p}|random|2.5|1" for p in PTQ])
  assert sorted(data["controls"]["joint"]["by_seed"]) == ["0", "1"]
  assert data["meta"]["layer_names"] == ["encoder/layers_0", "decoder/layers_0"]
  summ = data["summary"]
  assert set(summ["paper_vs_others"]) == {"rtn", "gptq", "qat"}
  assert set(summ["paper_vs_others"]["qat"]) == set(METHODS) - {"paper_combined"}
  assert len(summ["lambda_noise"]["lambda_spearman_per_layer"]) == 2
  md = (w / "s" / "study.md").read_text()
  assert "## Arms at 2.5 code_bits" in md and "## The paper's rule against each arm" in md
  assert "Multiplicity" in md and "Lambda's own noise" in md and "## PTQ by GPTQ" in md
  # finished phases and cells are reused: a second invocation trains nothing
  assert main(["study", "--config", str(w / "micro.py"), "--workdir", str(w / "s"), "--quick"]) == 0
  again = json.loads((w / "s" / "study.json").read_text())
  assert again["invocations"][-1]["new_cells"] == 0 and again["cells"] == data["cells"]


def test_equal_bytes(study):
  _, data, config = study
  view, _ = allocation_view(config)
  table = bytes_table(view, (1, 2, 3, 4, 8))[0, 0]  # one expert's bytes at each code
  budget = data["budget_bytes"]
  for key, a in data["allocations"].items():
    codes = np.asarray(a["codes_LxE"])
    assert a["bytes"] == achieved(view, codes)["bytes"] <= budget, key
    if key.startswith("uniform"):  # the largest single code within the budget
      assert len(set(codes.ravel())) == 1
      assert min(t for t in table * codes.size if t > a["bytes"]) > budget
    else:  # the rule floors n_high per layer: short by less than one expert's step per layer
      step = table[2] - table[1]  # int3 - int2 bytes of one expert (the bracketing levels)
      assert budget - a["bytes"] < step * view.num_layers, key
  for c in data["cells"].values():
    assert c["expert_bytes"] == data["allocations"][f"{c['method']}|2.5|{c['seed']}"]["bytes"]


def test_lambda_is_the_router_norm_change(study):
  w, data, config = study
  start = _params(config, w / "s" / "pretrain", "pretrain", PRE)
  for name, lam in ((f"finetune{FT}_0", data["stats"]["lambda"]),
                    (f"finetune{FT}_1", data["lambda_replicate"]["lambda"])):
    now = _params(config, w / "s" / name, "qat", FT)
    for row, stack in enumerate(("encoder", "decoder")):
      norm = lambda p: np.linalg.norm(np.asarray(p[stack]["layers_0"]["moe"]["router"]["kernel"]),
                                      axis=0)
      np.testing.assert_allclose(lam[row], norm(now) - norm(start), rtol=1e-4, atol=1e-6)


def test_ptq_uniform_row_is_an_independent_rtn_eval(study):
  w, data, config = study
  cfg = switch_config(config)
  teacher = _params(config, w / "s" / f"finetune{FT}_0", "qat", FT)
  valid = slice_corpus(config.data.task_packages, config.data.valid_fraction).valid
  held = [span_corruption_batch(valid, 8, 48, 1234, b, sentinel_ids=t5_sentinel_ids(320, 64),
                                decoder_start_id=0) for b in range(2)]
  ref = evaluate_seq2seq(cfg, {"params": teacher}, held)
  assert data["reference"]["finetuned_fp_bits_per_byte"] == pytest.approx(ref["bits_per_token"],
                                                                           rel=1e-6)
  codes = np.asarray(data["allocations"]["uniform|2.5|0"]["codes_LxE"])
  quant = set_expert_codes(default_quant(cfg), codes)
  rtn = evaluate_seq2seq(cfg, {"params": init_ratios(cfg, teacher, quant), "quant": quant}, held)
  row = data["ptq_cells"]["rtn|uniform|2.5|0"]
  assert row["bits_per_byte"] == pytest.approx(rtn["bits_per_token"], rel=1e-6)
  agree = np.mean([np.mean(ref["expert_idx"][s] == rtn["expert_idx"][s])
                   for s in ("encoder", "decoder")])
  assert row["top1_agree"] == pytest.approx(agree, abs=1e-9)
  # Equal-length examples: the paired Δ vs the teacher is the difference of the means.
  r = data["summary"]["ptq_table"]["rtn|uniform|2.5"]
  assert r["delta_vs_teacher"] == pytest.approx(rtn["bits_per_token"] - ref["bits_per_token"],
                                                abs=1e-9)
  q = data["summary"]["table"]["joint|uniform|2.5"]["paired"]
  cells = [data["cells"][f"joint|uniform|2.5|{s}"] for s in (0, 1)]
  ctl = data["controls"]["joint"]["by_seed"]
  assert q["delta_vs_control"] == pytest.approx(
      np.mean([c["bits_per_byte"] for c in cells])
      - np.mean([ctl[s]["bits_per_byte"] for s in ("0", "1")]), abs=1e-9)
  assert q["delta_vs_teacher_se"] > 0


def test_ptq_gptq_row_is_an_independent_gptq_eval(study):
  """The GPTQ row of uniform: GPTQ (the library's, shared with `moeqjax ptq`) of the teacher
  restored here, on Hessians from the qat phase's first span-corruption training batches, scores
  the row's bits; GPTQ's calibration error is below round-to-nearest's."""
  from moeqjax.model import SwitchTransformer
  from moeqjax.pipeline.ptq import gptq_experts
  from moeqjax.pipeline.ptq_calib import CalibBatch, model_hessians
  w, data, config = study
  cfg = switch_config(config)
  gq_cfg = cfg.replace(quant=dataclasses.replace(cfg.quant, stored_ratio=True))
  teacher = _params(config, w / "s" / f"finetune{FT}_0", "qat", FT)
  task = slice_corpus(config.data.task_packages, config.data.valid_fraction)
  calib = []
  for step in range(config.study.ptq_calib_batches):
    b = span_corruption_batch(task.train, 4, 48, config.qat.seed, step,
                              sentinel_ids=t5_sentinel_ids(320, 64), decoder_start_id=0)
    calib.append(CalibBatch((b.encoder_ids, b.decoder_ids)))
  hessians = model_hessians(SwitchTransformer(cfg), cfg.moe_config(), teacher, calib)
  codes = np.asarray(data["allocations"]["uniform|2.5|0"]["codes_LxE"])
  quant = set_expert_codes(default_quant(gq_cfg), codes)
  params, report = gptq_experts(gq_cfg, init_ratios(gq_cfg, teacher, quant), hessians, codes)
  held = [span_corruption_batch(task.valid, 8, 48, 1234, b, sentinel_ids=t5_sentinel_ids(320, 64),
                                decoder_start_id=0) for b in range(2)]
  got = evaluate_seq2seq(gq_cfg, {"params": params, "quant": quant}, held)
  row = data["ptq_cells"]["gptq|uniform|2.5|0"]
  assert row["bits_per_byte"] == pytest.approx(got["bits_per_token"], rel=1e-6)
  assert row["calib_output_error"] == pytest.approx(report["calib_output_error"], rel=1e-6)
  assert row["calib_output_error"]["gptq"] < row["calib_output_error"]["rtn"]
  assert row["bits_per_byte"] != data["ptq_cells"]["rtn|uniform|2.5|0"]["bits_per_byte"]
