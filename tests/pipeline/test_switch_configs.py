"""configs/switch_tiny.py and configs/switch_base_64.py: they build, match HF's shapes, and the base model's size."""

import math
import pathlib

import jax
import numpy as np
import pytest

from moeqjax.convert.switch_hf_config import switch_config_to_hf_config
from moeqjax.data.seq2seq import span_lengths, t5_sentinel_ids
from moeqjax.model.switch import switch_param_shapes
from moeqjax.pipeline.config import ConfigError, apply_overrides, load_config, switch_config
from moeqjax.quant import memory

CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs"


def test_switch_tiny_builds_and_its_capacity_fits_its_windows():
  config = load_config(CONFIGS / "switch_tiny.py")
  cfg = switch_config(config)
  assert cfg.encoder_sparse_layers == cfg.decoder_sparse_layers == (1, 3)  # every 2nd layer
  assert cfg.vocab_size == 256 + config.seq2seq.num_sentinels
  sentinels = t5_sentinel_ids(cfg.vocab_size, config.seq2seq.num_sentinels)
  assert min(sentinels) == 256  # no byte id is a sentinel
  enc_len, dec_len = span_lengths(config.seq2seq.window, config.seq2seq.noise_density,
                                  config.seq2seq.mean_span_length)
  # The capacity is 1.25x an expert's balanced share of an encoder input, as its comment says.
  assert cfg.expert_capacity == math.ceil(1.25 * enc_len / cfg.num_experts), (enc_len, dec_len)
  assert config.pretrain.seq_len == config.qat.seq_len == config.seq2seq.window
  assert cfg.quant.expert_code == 1 and cfg.quant.scale_init == "mse"


def test_switch_config_errors_are_one_line_config_errors():
  config = load_config(CONFIGS / "switch_tiny.py")
  apply_overrides(config, {"model.num_sparse_encoder_layers": "3"})
  with pytest.raises(ConfigError, match="num_sparse_encoder_layers=3") as e:
    switch_config(config)
  assert "\n" not in str(e.value)
  config = load_config(CONFIGS / "switch_tiny.py")
  with config.model.unlocked():
    config.model.top_k = 2  # not a SwitchConfig field: Switch routes top-1
  with pytest.raises(ConfigError, match=r"unknown keys \['top_k'\]"):
    switch_config(config)


# google/switch-base-64 as the issue lists it (HF config.json names).
BASE_64 = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
               num_experts=64, expert_capacity=64, vocab_size=32128,
               relative_attention_num_buckets=32, relative_attention_max_distance=128,
               router_jitter_noise=0.01, num_sparse_encoder_layers=6,
               num_sparse_decoder_layers=6)


def _closed_form_params(d, f, a, h, v, layers, sparse, experts, tied):
  attn = 4 * d * h * a
  dense_ffn, expert_ffn = 2 * d * f, experts * 2 * d * f + d * experts  # + the router
  encoder = layers * (attn + 2 * d) + sparse * expert_ffn + (layers - sparse) * dense_ffn
  decoder = layers * (2 * attn + 3 * d) + sparse * expert_ffn + (layers - sparse) * dense_ffn
  relpos = 2 * 32 * h
  embeddings = v * d * (1 if tied else 3)  # untied: encoder, decoder embeddings and the LM head
  return encoder + decoder + 2 * d + relpos + embeddings


def test_switch_base_64_has_the_published_shapes_and_size():
  config = load_config(CONFIGS / "switch_base_64.py")
  cfg = switch_config(config)
  hf = switch_config_to_hf_config(cfg)
  for key, value in BASE_64.items():
    assert hf[key] == value, key
  assert cfg.encoder_sparse_layers == cfg.decoder_sparse_layers == (1, 3, 5, 7, 9, 11)  # step 2
  assert (config.loss.z, config.loss.lb) == (0.001, 0.001)  # router_z/aux_loss_coef
  shapes = switch_param_shapes(cfg)
  sizes = {"/".join(str(k.key) for k in path): int(np.prod(leaf.shape))
           for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
  total = sum(sizes.values())
  assert total == _closed_form_params(768, 3072, 64, 12, 32128, 12, 6, 64, cfg.tie_embeddings)
  assert total == 3_790_748_928  # the figure configs/switch_base_64.py quotes
  experts = {k: n for k, n in sizes.items() if k.endswith(("moe/w_in", "moe/w_out"))}
  assert sum(experts.values()) == 12 * 64 * 2 * 768 * 3072 == 3_623_878_656
  bf16 = 2 * total
  spec = cfg.quant.spec()
  per_expert = (memory.weight_bytes((768, 3072), 1, spec) +
                memory.weight_bytes((3072, 768), 1, spec))
  ternary = 2 * (total - sum(experts.values())) + 12 * 64 * per_expert
  assert (bf16, ternary) == (7_581_497_856, 1_245_608_448), (bf16, ternary)  # as quoted
  print(f"switch-base-64: {total:,} params; {bf16 / 1e9:.2f} GB bf16; "
        f"{ternary / 1e9:.2f} GB with ternary experts")


def test_switch_base_64_matches_transformers_parameter_count():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = switch_config(load_config(CONFIGS / "switch_base_64.py"))
  hf_config = transformers.SwitchTransformersConfig(**{
      k: v for k, v in switch_config_to_hf_config(cfg).items()
      if k not in ("architectures", "model_type", "dtype", "torch_dtype")})
  for key, value in BASE_64.items():
    assert getattr(hf_config, key) == value, key
  assert (hf_config.encoder_sparse_step, hf_config.decoder_sparse_step) == (2, 2)
  with torch.device("meta"):
    model = transformers.SwitchTransformersForConditionalGeneration(hf_config)
  hf_total = sum(p.numel() for p in model.parameters())
  ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(switch_param_shapes(cfg)))
  assert ours == hf_total
