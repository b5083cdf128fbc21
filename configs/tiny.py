"""The tiny byte-level MoE that drives `moeqjax demo` and the tests (2-core CPU, minutes).

Launch:  moeqjax demo --config configs/tiny.py --workdir ./moeqjax_runs/demo
Override any field:  --config.pretrain.steps=100 --config.model.dispatch=dense
"""

import ml_collections

from moeqjax.train.mesh import DEFAULT_RULES


def get_config():
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict(dict(
      vocab_size=256,  # byte-level tokens
      d_model=64,  # residual width D
      num_layers=2,
      num_heads=4,  # query heads
      num_kv_heads=2,  # grouped-query attention
      head_dim=16,
      d_ff=128,  # hidden size F of each routed expert
      num_experts=8,  # E
      top_k=2,  # k experts per token
      norm_topk_prob=True,  # renormalise top-k gates (Mixtral style)
      shared_d_ff=0,  # no shared expert
      shared_expert_gate=False,
      rope_theta=10000.0,
      norm_eps=1e-6,
      qk_norm="none",
      attn_bias=False,
      clip_qkv=0.0,
      tie_embeddings=False,
      # dropless grouped matmul (jax.lax.ragged_dot); "dense" is the oracle; "ep" sends tokens to
      # their experts' shards over mesh.expert (expert parallelism)
      dispatch="ragged",
      capacity_factor=0.0,  # 0 = dropless; C > 0: ceil(C * S*k / E) pairs per expert and sequence
      max_seq_len=128,
      dtype="float32",
      param_dtype="float32",
  ))

  c.quant = ml_collections.ConfigDict(dict(
      expert_code=1,  # default expert code in QAT: 1 ternary, 2/3/4/8 intN; 0 full precision (control)
      attn_code=0,  # attention stays full precision
      shared_code=0,
      router_code=0,  # the router stays full precision
      lm_head_code=0,
      act_bits=0,  # weights only
      granularity="channel",  # one scale per output channel of each expert matrix
      group_size=32,
      symmetric=True,
      ternary_method="absmean",  # BitNet b1.58
      learn_clip=False,
      learn_scale=False,  # LSQ scale ratios for ternary and intN (exclusive with learn_clip)
      stored_ratio=False,  # ptq --method gptq sets it: GPTQ's scale ratios, kept fixed
      scale_init="mse",  # grid-searched MSE-optimal scale per group (benchmarks/scale_error.py); "absmax"
      ternary_packing="2bit",
      scale_bytes=2,  # fp16 scales
  ))

  c.data = ml_collections.ConfigDict(dict(
      path="",  # "" = the embedded Python-stdlib corpus; or a text file, folder, .jsonl, .parquet, .arrow
      valid_fraction=0.05,  # share of files (or records) held out for evaluation
      text_field="text",  # field (.jsonl) or column (.parquet/.arrow/.feather) that holds the text
      tokenizer="",  # "" = UTF-8 bytes (vocab 256); or a folder with a HF tokenizer.json (--tokenizer)
  ))

  # Full-precision pretraining of the teacher.
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=600,
      batch_size=16,
      seq_len=64,
      learning_rate=3e-3,
      warmup_steps=30,
      end_lr_fraction=0.1,
      weight_decay=0.1,
      grad_clip=1.0,
      seed=0,
      log_every=10,
      ckpt_every=200,
  ))

  # Quantization-aware fine-tuning from the pretrained model (student = teacher at step 0).
  c.qat = ml_collections.ConfigDict(dict(
      steps=150,
      batch_size=16,
      seq_len=64,
      learning_rate=1e-3,
      warmup_steps=10,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      grad_clip=1.0,
      seed=1,
      log_every=10,
      ckpt_every=50,
  ))

  # The joint QAT objective (METHODS.md section 3); a zero weight switches a term off.
  c.loss = ml_collections.ConfigDict(dict(
      task=1.0,  # next-token cross-entropy
      rec=1.0,  # MSE of each MoE block output vs the teacher
      kd=1.0,  # KL of final logits vs the teacher
      # Routing value and structure at 1.0 (was 0.1): top-k drift vs the control -0.021 instead of
      # -0.029, beyond seed noise in 4 seeds (docs/results/routing_drift.md)
      value=1.0,  # KL of router distributions (routing value alignment)
      struct=1.0,  # top-k boundary hinge (routing structure alignment)
      lb=0.01,  # load balancing; 1/top_k of HF's loss: lb = c is router_aux_loss_coef = c/top_k
      z=0.001,  # router z-loss
      kd_temperature=1.0,
      value_temperature=1.0,
      struct_margin=0.5,
      struct_rank_weight=0.0,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      seq_len=128,  # window length for held-out bits per byte
      num_windows=512,  # windows spread evenly over the validation split (65,536 scored bytes)
      batch_size=16,
  ))
  # Device mesh: axis sizes (-1 = the devices left over) and the logical-axis rules that map the
  # model's parameter names and the batch to mesh axes (first free match wins, as in MaxText).
  # On one device this is today's unsharded run; on N devices the default is N-way data parallel.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1,
      logical_axis_rules=DEFAULT_RULES,
  ))
  return c
