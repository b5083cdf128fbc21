"""google/switch-base-64 (Fedus et al. 2021) at its published shapes: a T5-base encoder-decoder with 64 top-1 experts in every 2nd layer.

Launch (a local copy of the checkpoint, e.g. `huggingface-cli download google/switch-base-64
--local-dir ./switch-base-64`; import-hf reads its config.json, safetensors and tokenizer.json):
  moeqjax import-hf --hf-dir ./switch-base-64 --out W/imp --config configs/switch_base_64.py
  moeqjax qat --teacher W/imp --workdir W/ctl --config.quant.expert_code=0 \
      --config.seq2seq.pairs=pairs.jsonl  # the full-precision control on (source, target) pairs
  moeqjax stats --workdir W/ctl
  moeqjax allocate --workdir W/ctl --method paper_combined --budget 2.5
  moeqjax qat --teacher W/imp --workdir W/mix --allocation W/ctl/allocation.json \
      --config.seq2seq.pairs=pairs.jsonl
  moeqjax eval --workdir W/mix --control W/ctl
  moeqjax export --workdir W/mix --format hf --out W/hf  # transformers loads it
(qat without --config starts from W/imp/config.py: this file's sections, the checkpoint's model
section and the T5 tokenizer's sentinels <extra_id_0..99> = ids 32099..32000.) Drop
--config.seq2seq.pairs to span-corrupt data.path (or the bundled corpus) instead.

Size (computed in tests/pipeline/test_switch_configs.py from the model's param shapes, checked there
against a closed form and against transformers' own model built on the meta device): 3,790,748,928
parameters with tied embeddings, of which 3,623,878,656 are expert weights (12 sparse layers x 64
experts x 2 x 768 x 3072): 7.58 GB at bf16; 1.25 GB with ternary experts (2-bit packed, an fp16
scale per output channel) and everything else bf16.
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
  # switch_tiny's data / seq2seq / pretrain / qat / eval sections, resized below for the base model.
  c = _switch_tiny()

  # HF config.json key in brackets where the name differs. Verified against transformers'
  # SwitchTransformersConfig (its defaults) and HF's google/switch-base-* naming; see the notes.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=32128,  # T5's SentencePiece vocab (32000 + 100 sentinels, padded to 32128)
      d_model=768,
      d_kv=64,  # head dim
      num_heads=12,
      d_ff=3072,  # dense FFN and each expert (transformers' default is 2048; base-64 uses 3072)
      num_layers=12,  # encoder
      num_decoder_layers=12,
      # 6 of 12: sparse step 2 (encoder_sparse_step / decoder_sparse_step), layers 1, 3, ..., 11
      num_sparse_encoder_layers=6,
      num_sparse_decoder_layers=6,
      num_experts=64,
      expert_capacity=64,  # tokens per expert per sequence (HF's default too)
      router_bias=False,
      router_jitter=0.01,  # [router_jitter_noise]
      relative_attention_num_buckets=32,
      relative_attention_max_distance=128,
      norm_eps=1e-6,  # [layer_norm_epsilon]
      # [tie_word_embeddings]: transformers' default (True). Whether the published config.json
      # overrides it could not be checked offline; from_hf_switch reads it from config.json.
      tie_embeddings=True,
      decoder_start_token_id=0,  # T5's pad id
      dispatch="ragged",
      dtype="bfloat16",
      param_dtype="bfloat16",
  ))

  c.quant = ml_collections.ConfigDict(dict(
      expert_code=1,  # ternary experts (the paper's low-bit end); 2/3/4/8 intN; 0 = control
      attn_code=0,
      shared_code=0,
      router_code=0,
      lm_head_code=0,
      act_bits=0,
      granularity="channel",
      group_size=32,
      symmetric=True,
      ternary_method="absmean",
      learn_clip=False,
      learn_scale=False,
      stored_ratio=False,
      scale_init="mse",
      ternary_packing="2bit",
      scale_bytes=2,
  ))

  # HF's training-time router loss coefficients (router_z_loss_coef, router_aux_loss_coef) are
  # the joint objective's z and lb here: seq2seq_loss_terms uses Switch's own losses at HF's scale.
  c.loss = ml_collections.ConfigDict(dict(
      task=1.0,
      rec=1.0,
      kd=1.0,
      value=1.0,
      struct=1.0,
      lb=0.001,  # router_aux_loss_coef
      z=0.001,  # router_z_loss_coef
      kd_temperature=1.0,
      value_temperature=1.0,
      struct_margin=0.1,
      struct_rank_weight=0.0,
  ))

  c.data.tokenizer = ""  # import-hf sets the checkpoint's own tokenizer.json (T5 SentencePiece)
  c.seq2seq.update(dict(
      window=512,  # raw tokens per span-corrupted example (T5 pretrained on 512-token inputs)
      num_sentinels=100,  # T5's <extra_id_0..99>
      first_sentinel_id=32099,  # <extra_id_0> in T5's 32100-id tokenizer (rows 32100.. are padding)
      source_len=512,  # with seq2seq.pairs: tokens per source and target
      target_len=128,
  ))
  c.qat.update(dict(steps=1000, batch_size=8, seq_len=512, learning_rate=1e-4, warmup_steps=50,
                    log_every=10, ckpt_every=200))
  c.pretrain.update(dict(seq_len=512))  # unused: the teacher is the imported checkpoint
  c.eval.update(dict(num_batches=32, batch_size=8))
  return c
