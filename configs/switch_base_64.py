"""google/switch-base-64 (Fedus et al. 2021) at its published shapes: a T5-base encoder-decoder with 64 top-1 experts in every 2nd layer.

Launch:  not yet a CLI phase for Switch (see docs/guides/training.md, "Switch Transformer
(encoder-decoder) QAT, library level"). Build the model config with
moeqjax.pipeline.config.switch_config(load_config("configs/switch_base_64.py")), or import the
checkpoint itself with moeqjax.convert.switch_hf.from_hf_switch(<local HF folder>).

Size (computed in tests/pipeline/test_switch_configs.py from the model's param shapes, checked there
against a closed form and against transformers' own model built on the meta device): 3,790,748,928
parameters with tied embeddings, of which 3,623,878,656 are expert weights (12 sparse layers x 64
experts x 2 x 768 x 3072): 7.58 GB at bf16; 1.25 GB with ternary experts (2-bit packed, an fp16
scale per output channel) and everything else bf16.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()

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
  return c
