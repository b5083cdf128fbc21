"""A tiny byte-level Switch Transformer (T5 encoder-decoder, top-1 experts) for span-corruption pretraining + ternary QAT on a 2-core CPU in minutes.

Launch:  moeqjax pretrain --config configs/switch_tiny.py --workdir W/pre
         moeqjax qat --teacher W/pre --workdir W/ctl --config.quant.expert_code=0  # the control
         moeqjax qat --teacher W/pre --workdir W/qat          # ternary experts (config from W/pre)
         moeqjax stats --workdir W/ctl
         moeqjax allocate --workdir W/ctl --method paper_router --budget 2.5
         moeqjax qat --teacher W/pre --workdir W/mix --allocation W/ctl/allocation.json
         moeqjax ptq --teacher W/pre --workdir W/rtn --method rtn
         moeqjax eval --workdir W/qat --teacher W/pre --control W/ctl
         moeqjax pack --workdir W/qat --out W/packed
         moeqjax generate --packed W/packed --prompt 'def main(<extra_id_0>):'  # greedy
         moeqjax export --packed W/packed --format compressed-tensors --out W/ct  # or hf
         moeqjax demo --config configs/switch_tiny.py --workdir DEMO  # all of it, one report
The demo (its `demo` section: a 200-step teacher, QAT at 150 steps) took 417 s on a shared 2-core CPU
(load 4-5): bits per target token teacher 3.7118, control 3.6809, RTN ternary 3.7207 (+0.0398 ±
0.0024 vs control), QAT ternary 3.6868 (+0.0059 ± 0.0013; top-1 agreement 0.834, control 0.841),
mc_moe mixed at 2.5 code bits 3.6838 (+0.0029 ± 0.0009; agreement 0.860).
See docs/guides/training.md "Switch Transformer (encoder-decoder)" for what each writes and the
measured figures; tests/cli/test_switch_pipeline.py runs the same commands at a smaller size.
"""

import ml_collections

from moeqjax.train.mesh import DEFAULT_RULES

VOCAB_BYTES = 256  # UTF-8 bytes are token ids 0..255
NUM_SENTINELS = 64  # T5 sentinels <extra_id_0..63>: the top 64 ids, 319 down to 256


def get_config():
  c = ml_collections.ConfigDict()

  # SwitchConfig fields (moeqjax.model.config.SwitchConfig), names as in HF's
  # SwitchTransformersConfig where they mean the same.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=VOCAB_BYTES + NUM_SENTINELS,  # 320: bytes + sentinels (data.t5_sentinel_ids)
      d_model=64,  # residual width D
      d_kv=16,  # head dim of every attention
      num_heads=4,  # attention heads (num_heads * d_kv = 64 = D)
      d_ff=128,  # hidden size of a dense FFN and of one expert
      num_layers=4,  # encoder layers
      num_decoder_layers=4,
      # HF's rule: step = 4 // 2 = 2, so layers 1 and 3 of each stack are sparse (every 2nd layer)
      num_sparse_encoder_layers=2,
      num_sparse_decoder_layers=2,
      num_experts=8,  # E; top-1 routing (Switch)
      # per sequence, an expert takes its first 18 tokens: ceil(1.25 x the balanced share, 1/8, of
      # a 115-token encoder input) (seq2seq.window=128, noise 0.15, spans of 3: span_lengths)
      expert_capacity=18,
      router_bias=False,  # HF Switch has none
      router_jitter=0.01,  # multiplicative router-input noise in training (HF's default)
      relative_attention_num_buckets=32,  # T5 / HF default
      relative_attention_max_distance=128,  # T5 / HF default
      norm_eps=1e-6,
      tie_embeddings=True,  # one embedding for encoder, decoder and LM head (HF's default)
      decoder_start_token_id=0,  # byte 0 (NUL) never occurs in the corpus' text
      dispatch="ragged",  # dropless grouped matmul; the capacity masks the dropped tokens
      dtype="float32",
      param_dtype="float32",
  ))

  # What the QAT student quantizes (moeqjax.model.config.QuantRules).
  c.quant = ml_collections.ConfigDict(dict(
      expert_code=1,  # every expert of every sparse layer ternary; 0 = full precision (control)
      attn_code=0,  # attention stays full precision
      shared_code=0,  # the dense (non-sparse) FFN layers stay full precision
      router_code=0,  # the routers stay full precision
      lm_head_code=0,  # unused with tied embeddings
      act_bits=0,  # weights only
      granularity="channel",  # one scale per output channel of each expert matrix
      group_size=32,
      symmetric=True,
      ternary_method="absmean",  # BitNet b1.58
      learn_clip=False,
      learn_scale=False,
      stored_ratio=False,
      scale_init="mse",  # grid-searched MSE-optimal scale per channel
      ternary_packing="2bit",
      scale_bytes=2,  # fp16 scales
  ))

  c.data = ml_collections.ConfigDict(dict(
      path="",  # "" = the embedded Python-stdlib corpus, as bytes
      valid_fraction=0.05,  # share of files held out for evaluation
      text_field="text",
      tokenizer="",  # "" = UTF-8 bytes; the sentinels sit above them
  ))

  # T5 span corruption (moeqjax.data.seq2seq.span_corruption_batch) of raw windows.
  c.seq2seq = ml_collections.ConfigDict(dict(
      window=128,  # raw tokens per example: encoder 115 tokens, decoder 25 (span_lengths)
      noise_density=0.15,  # T5's default
      mean_span_length=3.0,  # T5's default
      num_sentinels=NUM_SENTINELS,
      # id of <extra_id_0>, the others counting down; -1 = model.vocab_size - 1 (above the bytes).
      # A T5 tokenizer's own: 32099 for switch-base-*'s 32100 ids in 32128 rows (import-hf sets it)
      first_sentinel_id=-1,
      # "" = span corruption of the corpus; else a .jsonl/.parquet/.arrow/.feather file of
      # (source_field, target_field) records to train and evaluate on, the last
      # data.valid_fraction of them held out, cut/padded to source_len / target_len tokens
      pairs="",
      source_field="text",
      target_field="summary",
      source_len=0,
      target_len=0,
  ))

  # Full-precision span-corruption pretraining of the teacher (seq_len = raw window tokens).
  c.pretrain = ml_collections.ConfigDict(dict(
      steps=600,
      batch_size=16,
      seq_len=128,  # = seq2seq.window
      learning_rate=1e-2,
      warmup_steps=30,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      grad_clip=1.0,
      seed=0,
      log_every=10,
      ckpt_every=200,
  ))

  # QAT of the ternary student from the teacher (student = teacher at step 0).
  c.qat = ml_collections.ConfigDict(dict(
      steps=150,
      batch_size=16,
      seq_len=128,
      learning_rate=1e-3,
      warmup_steps=10,
      end_lr_fraction=0.1,
      weight_decay=0.0,
      grad_clip=1.0,
      seed=1,
      log_every=10,
      ckpt_every=50,
  ))

  # The joint objective (moeqjax.objectives.seq2seq_loss_terms) over every sparse layer.
  c.loss = ml_collections.ConfigDict(dict(
      task=1.0,  # decoder cross-entropy on the target tokens
      rec=1.0,  # MSE of each sparse layer's MoE output vs the teacher (encoder and decoder)
      kd=1.0,  # KL of the decoder's final logits vs the teacher
      value=1.0,  # KL of router distributions (routing value alignment)
      struct=1.0,  # top-1 boundary hinge (routing structure alignment)
      lb=0.001,  # Switch's aux loss, HF scale (router_aux_loss_coef), encoder + decoder
      z=0.001,  # Switch's router z-loss (router_z_loss_coef), encoder + decoder
      kd_temperature=1.0,
      value_temperature=1.0,
      struct_margin=0.1,
      struct_rank_weight=0.0,  # top-1: no in-set order to keep
  ))

  # Held-out evaluation: fixed span-corruption batches of the validation split.
  c.eval = ml_collections.ConfigDict(dict(
      num_batches=16,
      batch_size=16,
      seed=1234,  # batch b is span_corruption_batch(valid, ..., seed, b)
      # with seq2seq.pairs: ROUGE-1/2/Lsum of greedy summaries of the first this many held-out
      # pairs (eval/rouge.py; needs rouge-score, in the `data` extra)
      rouge_examples=64,
  ))

  # Progressive QAT (re-allocation during QAT from the run's own router statistics); off: every = 0.
  # On: e.g. --config.realloc.every=50 --config.realloc.budget=2.5 (the sparse layers' codes).
  c.realloc = ml_collections.ConfigDict(dict(every=0, method="paper_combined", budget=2.5,
                                             budget_unit="code_bits", seed=0, levels=()))

  # Device mesh of pretrain / qat (as configs/tiny.py's): axis sizes (-1 = the devices left over)
  # and the logical-axis rules; e.g. --config.mesh.data=2 --config.mesh.expert=4 on 8 devices
  # splits the batch and the experts (GSPMD's collectives; evaluation runs on one device).
  c.mesh = ml_collections.ConfigDict(dict(
      data=-1, fsdp=1, expert=1, tensor=1,
      logical_axis_rules=DEFAULT_RULES,
  ))

  # `moeqjax demo` only (pipeline/switch_demo.py): steps that replace pretrain.steps and
  # qat.steps in the demo alone, so that it finishes in minutes; 0 keeps the section's steps.
  # The demo pretrains its teacher for 200 of the 600 steps (600 took 462 s of its 1032 s under
  # load); QAT keeps its 150 steps.
  c.demo = ml_collections.ConfigDict(dict(
      pretrain_steps=200,
      qat_steps=0,
  ))
  return c
