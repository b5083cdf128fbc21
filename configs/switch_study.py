"""The paper's protocol on a small byte-level Switch Transformer (issue 19): fine-tune, Lambda, allocation arms at equal expert bytes, PTQ and QAT, seeds.

configs/switch_tiny.py's architecture at a smaller size (D=32, 2+2 layers, every layer sparse: 4
sparse layers x 8 experts of F=64, 64-byte span-corruption windows), pretrained on the stdlib's
top-level modules and fine-tuned on a DIFFERENT slice (asyncio, email, http, urllib), as the
decoder-only study does (configs/study_tiny.py). Sized so that the whole --quick study (pretrain,
two fine-tunes, 7 arms x PTQ + QAT x 2 seeds, 2 controls) runs in at most about 25 minutes niced
on a loaded 2-core CPU; measured from scratch under `nice -n 10` on a 2-core CPU shared with two
other jobs (load average 6-8): --quick 6.9 min, the default settings with
--config.study.seeds=3 (300-step fine-tunes, 120 QAT steps, 24 QAT runs) 10.8 min.

Launch:  moeqjax study --config configs/switch_study.py --workdir ./moeqjax_runs/switch_study [--quick]
Protocol: moeqjax/pipeline/switch_study.py; results: docs/results/switch_study.md.
"""

import importlib.util
import pathlib

import ml_collections


def _switch_tiny():
  path = pathlib.Path(__file__).with_name("switch_tiny.py")
  spec = importlib.util.spec_from_file_location("moeqjax_config_switch_tiny", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config():
  c = _switch_tiny()
  c.model.update(dict(
      d_model=32, d_kv=8, num_heads=4, d_ff=64,  # switch_tiny: 64, 16, 4, 128
      num_layers=2, num_decoder_layers=2,  # switch_tiny: 4 + 4
      num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,  # every layer sparse
      # per sequence: ceil(1.25 x 57 / 8) for a 64-byte window's 57-token encoder input
      expert_capacity=9,
      relative_attention_num_buckets=16, relative_attention_max_distance=64))
  c.seq2seq.window = 64
  c.data.update(dict(pretrain_packages=("<top-level>",),
                     task_packages=("asyncio", "email", "http", "urllib")))
  c.pretrain.update(dict(steps=500, batch_size=16, seq_len=64, learning_rate=1e-2,
                         warmup_steps=30, log_every=50, ckpt_every=0))
  # Every QAT cell and control (the fine-tune uses this optimizer at study.finetune_learning_rate).
  c.qat.update(dict(steps=120, batch_size=16, seq_len=64, learning_rate=1e-3, warmup_steps=10,
                    log_every=20, ckpt_every=0))
  c.eval.update(dict(num_batches=32, batch_size=16))  # 512 held-out examples
  c.study = ml_collections.ConfigDict(dict(
      finetune_steps=300,  # full-precision fine-tune on the task slice: its router norm change
      finetune_learning_rate=1e-3,
      methods=("paper_combined", "paper_router", "paper_router_reversed", "frequency", "mc_moe",
               "random", "uniform"),
      seeds=2,  # QAT seeds per arm (random: one order per seed)
      budget=2.5,
      budget_unit="code_bits",  # average stored bits per expert weight, scales excluded
      choices=(1, 2, 3, 4, 8),
      levels=(),  # () = the two codes whose bytes bracket the budget (int2 / int3 at 2.5)
      ptq=("rtn", "gptq"),  # post-training rows: round-to-nearest and GPTQ at every arm's codes
      ptq_calib_batches=8,  # GPTQ's Hessians: this many qat-phase training batches of the task
      quick=dict(seeds=2, finetune_steps=150, qat_steps=60),
  ))
  return c
