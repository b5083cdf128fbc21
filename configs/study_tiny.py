"""The allocation x objective study on a very small byte-level MoE (2-core CPU: default <= 30 min, --quick <= 5 min).

Launch:  moeqjax study --config configs/study_tiny.py --workdir ./moeqjax_runs/study [--quick]
Override any field:  --config.study.seeds=2 --config.qat.steps=40

Protocol (see moeqjax/pipeline/study.py): pretrain a full-precision model on the top-level modules of the
Python standard library; fine-tune it in full precision on a DIFFERENT slice (the asyncio, email, http and
urllib packages) while the jitted step collects router statistics; allocate expert bits from those
statistics at equal expert weight bytes; run QAT on the task slice for every (method, objective, seed);
evaluate on the held-out files of the task slice against the fine-tuned full-precision model.
"""

import ml_collections

from moeqjax.train.mesh import DEFAULT_RULES


def get_config():
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256,  # byte-level tokens
      d_model=32,  # residual width D (demo: 64); small so that ~200 QAT runs fit in 30 min
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=8,
      d_ff=64,  # hidden size F of each routed expert
      num_experts=8,  # E
      top_k=2,
      norm_topk_prob=True,
      shared_d_ff=0,
      shared_expert_gate=False,
      rope_theta=10000.0,
      norm_eps=1e-6,
      qk_norm="none",
      attn_bias=False,
      clip_qkv=0.0,
      tie_embeddings=False,
      dispatch="ragged",
      max_seq_len=128,
      dtype="float32",
      param_dtype="float32",
  ))

  c.quant = ml_collections.ConfigDict(dict(
      expert_code=1,  # default code; the study sets per-expert codes
      attn_code=0,
      shared_code=0,
      router_code=0,
      lm_head_code=0,
      act_bits=0,
      granularity="channel",  # per output channel scales (0.42 bits/weight of overhead at D=32)
      group_size=32,
      symmetric=True,
      ternary_method="absmean",
      learn_clip=False,
      learn_scale=False,  # LSQ scale ratios for ternary and intN (exclusive with learn_clip)
      stored_ratio=False,  # ptq --method gptq sets it: GPTQ's scale ratios, kept fixed
      scale_init="absmax",  # "mse": grid-searched MSE-optimal scale per group
      ternary_packing="base3",  # ternary stored at 1.6 bits so that budgets below 2 bits are reachable
      scale_bytes=2,
  ))

  c.data = ml_collections.ConfigDict(dict(
      path="",  # the embedded stdlib corpus, sliced below
      valid_fraction=0.05,
      text_field="text",
      tokenizer="",  # "" = bytes; or a folder with a HF tokenizer.json
      # Pretraining: the stdlib's top-level modules (files with no folder), ~4.7 MB.
      pretrain_packages=("<top-level>",),
      # The fine-tuning task: a different slice, four packages (~1.2 MB).
      task_packages=("asyncio", "email", "http", "urllib"),
  ))

  c.pretrain = ml_collections.ConfigDict(dict(
      steps=800, batch_size=16, seq_len=64, learning_rate=3e-3, warmup_steps=50,
      end_lr_fraction=0.1, weight_decay=0.1, grad_clip=1.0, seed=0, log_every=50, ckpt_every=400,
  ))

  # QAT of every cell (and the optimizer of the full-precision fine-tune that collects statistics).
  c.qat = ml_collections.ConfigDict(dict(
      steps=60, batch_size=8, seq_len=64, learning_rate=1e-3, warmup_steps=10,
      end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0, seed=1, log_every=20, ckpt_every=0,
  ))

  # Base loss weights; the study's objectives below override task/rec/kd/value/struct.
  c.loss = ml_collections.ConfigDict(dict(
      task=1.0, rec=1.0, kd=1.0, value=1.0, struct=1.0, lb=0.01, z=0.001, kd_temperature=1.0,
      value_temperature=1.0, struct_margin=0.5, struct_rank_weight=0.0,
  ))

  c.eval = ml_collections.ConfigDict(dict(seq_len=64, num_windows=96, batch_size=32))

  # Progressive QAT (re-allocation during QAT); off here: every = 0.
  c.realloc = ml_collections.ConfigDict(dict(every=0, method="paper_combined", budget=2.5,
                                             budget_unit="code_bits", seed=0, levels=()))

  c.study = ml_collections.ConfigDict(dict(
      finetune_steps=300,  # full-precision fine-tune on the task slice that collects the statistics
      finetune_learning_rate=1e-3,
      # paper_router_reversed (Lambda's direction flipped) and router_norm (the paper's rule for
      # a released model: final router norm) test whether Lambda's signal is real here.
      methods=("paper_combined", "paper_router", "paper_router_reversed", "router_norm", "exact",
               "frequency", "mc_moe", "uniform", "random"),
      # name -> loss weights (task, rec = block-output MSE + final-logit KL, value, struct)
      objectives=dict(
          ce=dict(task=1.0, rec=0.0, kd=0.0, value=0.0, struct=0.0),
          rec=dict(task=1.0, rec=1.0, kd=1.0, value=0.0, struct=0.0),
          value=dict(task=1.0, rec=0.0, kd=0.0, value=1.0, struct=0.0),
          struct=dict(task=1.0, rec=0.0, kd=0.0, value=0.0, struct=1.0),
          all=dict(task=1.0, rec=1.0, kd=1.0, value=1.0, struct=1.0),
      ),
      seeds=3,
      budget_unit="code_bits",  # average stored bits per expert weight, scales excluded
      main_budget=1.8,  # the method x objective grid (ternary/int2 mix for the rule-based methods)
      pareto_budgets=(1.8, 2.25, 2.5, 3.5, 4.5),  # for the best objective; see study.md on why not 2/3/4
      choices=(1, 2, 3, 4, 8),
      # The paper's levels (bh, bl) for the rule-based methods, e.g. (3, 1); () = the two choices
      # whose bytes bracket the budget (ternary/int2 at 1.8 here, since base3 ternary is cheaper).
      levels=(),
      peers=True,  # Qwix QAT rows (int4 / int8 weights) when qwix is installed
      # Post-training rows (no training) of every allocation: () = none, or ("rtn", "gptq");
      # GPTQ's Hessians come from ptq_calib_batches task batches (qat.batch_size x qat.seq_len).
      ptq=(),
      ptq_calib_batches=8,
      # --quick: 9 methods x {ce, all} x 2 seeds at 1.8, plus 9 x 2 seeds at 2.5 for the best objective.
      quick=dict(seeds=2, objectives=("ce", "all"), pareto_budgets=(1.8, 2.5), qat_steps=30,
                 finetune_steps=100, peers=False),
  ))
  # Device mesh: axis sizes (-1 = the devices left over) and the logical-axis rules that map the
  # model's parameter names and the batch to mesh axes (first free match wins, as in MaxText).
  # On one device this is today's unsharded run; on N devices the default is N-way data parallel.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1,
      logical_axis_rules=DEFAULT_RULES,
  ))
  return c
