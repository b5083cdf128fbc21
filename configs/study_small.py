"""The allocation study at a larger scale (issue 11): PTQ (RTN, GPTQ) and QAT rows of every allocation method.

study_tiny's protocol, slices and grid on 7.2x its parameters (0.871M vs 0.122M: D=64, 4 layers,
8 experts of F=128, 0.79M expert weights vs 0.10M), pretrained 4x longer, at budgets 2.0 / 2.25 /
2.5 / 3.0 code bits, with MSE-optimal scales and post-training rows. Estimated at up to about 60
minutes on a 2-core CPU; measured: 69.4 min from scratch on a shared 2-core CPU (docs/results/study.md).

Launch:  moeqjax study --config configs/study_small.py --workdir ./moeqjax_runs/study_small [--quick]
"""

import importlib.util
import pathlib


def _study_tiny():
  path = pathlib.Path(__file__).with_name("study_tiny.py")
  spec = importlib.util.spec_from_file_location("moeqjax_config_study_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _study_tiny()
  c.model.update(d_model=64, num_layers=4, head_dim=16, d_ff=128)  # study_tiny: 32, 2, 8, 64
  # MSE-optimal scales for the QAT and RTN rows (GPTQ rows use their own absmax grid).
  c.quant.scale_init = "mse"
  c.pretrain.update(steps=3200, warmup_steps=100, log_every=100, ckpt_every=800)
  c.study.update(
      main_budget=2.25,  # the method x objective grid
      pareto_budgets=(2.0, 2.25, 2.5, 3.0),  # for the best objective
      ptq=("rtn", "gptq"),  # post-training rows of every allocation at every budget
  )
  # 512 held-out windows of 64 bytes = 32,768 bytes, so that window noise is small next to the
  # differences between methods (study_tiny: 96 windows, 6,144 bytes).
  c.eval.num_windows = 512
  # --quick: 9 methods x {ce, all} x 2 seeds at 2.25, plus 9 x 2 seeds at 2.5 for the best objective.
  c.study.quick.pareto_budgets = (2.25, 2.5)
  return c
