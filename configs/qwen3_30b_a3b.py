"""Qwen3-30B-A3B (30.5B params, 3.3B active per token): QAT of its 128 experts per layer (top-8).

Real shapes of Qwen/Qwen3-30B-A3B. Launch (see `moeqjax plan` for the memory it needs):
  moeqjax plan --config configs/qwen3_30b_a3b.py
  moeqjax import-hf --hf-dir /data/Qwen3-30B-A3B --out ./imported/qwen3_30b_a3b --config configs/qwen3_30b_a3b.py --dtype bfloat16
  moeqjax qat --config ./imported/qwen3_30b_a3b/config.py --teacher ./imported/qwen3_30b_a3b --workdir ./moeqjax_runs/qwen3_30b_a3b_qat --data /data/text --tokenizer /data/Qwen3-30B-A3B
  moeqjax export --workdir ./moeqjax_runs/qwen3_30b_a3b_qat --format hf --out ./qwen3_30b_a3b_quantized_hf
--tokenizer is the checkpoint's folder (its tokenizer.json, read offline; needs the `data` extra):
without it --data is read as UTF-8 bytes (ids 0..255), which the checkpoint's embeddings do not know.
"""
import ml_collections

from moeqjax.train.mesh import DEFAULT_RULES


def get_config():
  c = ml_collections.ConfigDict()

  # Real shapes of the released checkpoint; `moeqjax import-hf` writes the same values.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=151936,
      d_model=2048,  # hidden_size
      num_layers=48,
      num_heads=32,  # query heads
      num_kv_heads=4,  # grouped-query attention
      head_dim=128,  # explicit head_dim (heads * head_dim != hidden_size)
      d_ff=768,  # moe_intermediate_size
      num_experts=128,
      top_k=8,  # num_experts_per_tok
      norm_topk_prob=True,  # renormalise the top-8 gates
      shared_d_ff=0,  # no shared expert
      shared_expert_gate=False,
      rope_theta=1000000.0,
      norm_eps=1e-06,  # rms_norm_eps
      qk_norm='head',  # RMSNorm per head on q and k
      attn_bias=False,
      attn_out_bias=False,
      clip_qkv=0.0,
      tie_embeddings=False,
      max_seq_len=40960,  # max_position_embeddings
      dispatch="ragged",  # dropless grouped matmul (jax.lax.ragged_dot)
      dtype="bfloat16",  # activation dtype
      param_dtype="bfloat16",  # teacher and student weights; float32 doubles weight memory
  ))

  c.quant = ml_collections.ConfigDict(dict(
      expert_code=2,  # default expert code: 1 ternary, 2/3/4/8 intN; the allocator moves it per expert
      attn_code=0,  # attention stays full precision (a small share of the weights)
      shared_code=0,  # shared expert(s), if any, stay full precision
      router_code=0,  # the router stays full precision (routing decisions are fragile)
      lm_head_code=0,
      act_bits=0,  # weights only
      granularity="group",  # one scale per group of input weights: needed at 2 bits
      group_size=128,  # input weights per scale
      symmetric=True,
      ternary_method="absmean",  # BitNet b1.58, for experts the allocator sets to ternary
      learn_clip=False,
      learn_scale=False,  # LSQ scale ratios for ternary and intN (exclusive with learn_clip)
      stored_ratio=False,  # ptq --method gptq sets it: GPTQ's scale ratios, kept fixed
      scale_init="absmax",  # "mse": grid-searched MSE-optimal scale per group
      ternary_packing="2bit",
      scale_bytes=2,  # fp16 scales
  ))

  c.data = ml_collections.ConfigDict(dict(
      path="",  # your fine-tuning text: a text file, folder or .jsonl ("" = the stdlib corpus)
      valid_fraction=0.01,  # share of documents held out for evaluation
      text_field="text",  # field (.jsonl) or column (.parquet/.arrow/.feather) that holds the text
      tokenizer="",  # "" = UTF-8 bytes (vocab 256); or a folder with a HF tokenizer.json (--tokenizer)
  ))

  # Unused for imported checkpoints (`moeqjax import-hf` replaces pretraining); every section is
  # declared so the config validates.
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=1, batch_size=1, seq_len=128, learning_rate=1e-4, warmup_steps=0,
      end_lr_fraction=0.1, weight_decay=0.0, grad_clip=1.0, seed=0, log_every=1, ckpt_every=0,
  ))

  # Quantization-aware fine-tuning; the student starts at the released weights.
  c.qat = ml_collections.ConfigDict(dict(
      steps=500,  # a short fine-tune: the teacher is already trained
      batch_size=8,  # global batch (sequences), sharded over the device mesh
      seq_len=2048,
      learning_rate=1e-05,  # small: large steps destroy the pretrained weights
      warmup_steps=50,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      grad_clip=1.0,
      seed=1,
      log_every=10,
      ckpt_every=200,  # checkpoints are large; resume with --resume
  ))

  # The joint QAT objective (METHODS.md section 3); a zero weight switches a term off.
  c.loss = ml_collections.ConfigDict(dict(
      task=1.0,  # next-token cross-entropy
      rec=1.0,  # MSE of each MoE block output vs the teacher
      kd=1.0,  # KL of final logits vs the teacher
      value=0.1,  # KL of router distributions (routing value alignment)
      struct=0.1,  # top-k boundary hinge (routing structure alignment)
      lb=0.0,  # no load-balancing pressure: keep the released routing
      z=0.0,
      kd_temperature=1.0,
      value_temperature=1.0,
      struct_margin=0.5,
      struct_rank_weight=0.0,
  ))

  c.eval = ml_collections.ConfigDict(dict(
      seq_len=2048,  # window length for held-out perplexity
      num_windows=64,
      batch_size=8,
  ))
  # Device mesh: axis sizes (-1 = the devices left over) and the logical-axis rules that map the
  # model's parameter names and the batch to mesh axes (first free match wins, as in MaxText).
  # On one device this is today's unsharded run; on N devices the default is N-way data parallel.
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1,
      logical_axis_rules=DEFAULT_RULES,
  ))
  return c
