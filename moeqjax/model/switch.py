"""The Switch Transformer: a T5 encoder-decoder whose sparse layers are top-1 ReLU MoE blocks."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from moeqjax.model.config import SwitchConfig
from moeqjax.model.layers import QDense, RMSNorm
from moeqjax.model.moe import MoE
from moeqjax.model.t5_layers import DenseReluFF, RelativePositionBias, T5Attention
from moeqjax.model.transformer import AUX_KEYS

# S encoder positions, T decoder positions; aux tensors are stacked over a stack's sparse layers.


class SwitchBlock(nn.Module):
  """Pre-norm T5 block: self-attention, cross-attention (decoder only), then a dense or MoE FFN."""

  cfg: SwitchConfig
  sparse: bool
  is_decoder: bool

  @nn.compact
  def __call__(self, x_BxSxD, self_bias_HxSxK, self_mask_BxSxK, memory_BxMxD, cross_mask_BxSxM,
               decode: bool, start, train: bool):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def norm(name):
      return RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)

    h = norm("self_attn_norm")(x_BxSxD)
    x_BxSxD = x_BxSxD + T5Attention(cfg, name="self_attn")(
        h, h, self_bias_HxSxK, self_mask_BxSxK, "append" if decode else None, start)
    if self.is_decoder:
      h = norm("cross_attn_norm")(x_BxSxD)
      x_BxSxD = x_BxSxD + T5Attention(cfg, name="cross_attn")(
          h, memory_BxMxD, None, cross_mask_BxSxM, "memory" if decode else None)
    h = norm("mlp_norm")(x_BxSxD)
    if self.sparse:
      y, aux = MoE(cfg.moe_config(), name="moe")(h, train)
    else:
      y, aux = DenseReluFF(cfg, name="dense_mlp")(h), None
    return x_BxSxD + y, aux


class SwitchStack(nn.Module):
  """The encoder (bidirectional) or the decoder (causal, cross-attending) stack and its final norm.

  The relative position bias is computed once, from this stack's own table, and shared by every
  block (Hugging Face keeps the table in block 0). Returns (hidden [B, S, D], aux of the sparse
  layers, each key stacked as [L_sparse, ...]).
  """

  cfg: SwitchConfig
  is_decoder: bool

  @nn.compact
  def __call__(self, x_BxSxD, self_mask_BxSxK, memory_BxMxD=None, cross_mask_BxSxM=None,
               decode: bool = False, train: bool = False):
    cfg = self.cfg
    dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    b, s, _ = x_BxSxD.shape
    query_pos_S = key_pos_K = jnp.arange(s)
    start = 0
    cached = decode and self.has_variable("cache", "cache_index")
    if decode:
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      # Only its length is read: slot j of every layer's self-attention cache holds decoder
      # position j, so a zeroed cache (serve.init_switch_cache) is a valid empty one.
      slots = self.variable("cache", "slots", jnp.zeros, (s,), jnp.bool_)
    if cached:
      start = index.value
      query_pos_S, key_pos_K = start + jnp.arange(s), jnp.arange(slots.value.shape[0])
      self_mask_BxSxK = jnp.broadcast_to(key_pos_K[None, :] <= query_pos_S[:, None],
                                         (b, s, key_pos_K.shape[0]))
      index.value = start + s
    bias_HxSxK = RelativePositionBias(
        cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance, cfg.num_heads,
        bidirectional=not self.is_decoder, param_dtype=pdtype,
        name="relative_position_bias")(query_pos_S, key_pos_K)
    sparse = cfg.decoder_sparse_layers if self.is_decoder else cfg.encoder_sparse_layers
    per_layer = []
    for i in range(cfg.num_decoder_layers if self.is_decoder else cfg.num_layers):
      x_BxSxD, aux = SwitchBlock(cfg, i in sparse, self.is_decoder, name=f"layers_{i}")(
          x_BxSxD, bias_HxSxK, self_mask_BxSxK, memory_BxMxD, cross_mask_BxSxM, decode, start,
          train)
      if aux is not None:
        per_layer.append(aux)
    x_BxSxD = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=pdtype, name="final_norm")(x_BxSxD)
    return x_BxSxD, {key: jnp.stack([a[key] for a in per_layer]) for key in AUX_KEYS}


class SwitchTransformer(nn.Module):
  """(encoder ids [B, S], decoder ids [B, T]) -> (logits [B, T, V] float32, aux).

  aux = {"encoder": {...}, "decoder": {...}}: the routing tensors of model.AUX_KEYS, each stacked
  over that stack's sparse layers. Apply with `{"params": p}` (full precision) or with a `quant`
  collection too (the fake-quantized student); `train=True` turns on the router jitter (a
  "jitter" rng). `encode` + `decode` split the pass: the encoder runs once, and `decode` with
  decode=True extends a `cache` collection (self-attention keys/values, and the cross-attention
  keys/values of the encoder output, stored on the first call and read when memory is None).
  """

  cfg: SwitchConfig

  def setup(self):
    cfg = self.cfg
    pdtype = jnp.dtype(cfg.param_dtype)

    def embedding(name):
      init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed"))
      return self.param(name, init, (cfg.vocab_size, cfg.d_model), pdtype)

    if cfg.tie_embeddings:
      self.embedding = embedding("embedding")
    else:
      self.encoder_embedding = embedding("encoder_embedding")
      self.decoder_embedding = embedding("decoder_embedding")
      self.lm_head = QDense(cfg.vocab_size, ("embed", "vocab"), cfg.quant, cfg.quant.lm_head_code,
                            dtype=jnp.dtype(cfg.dtype), param_dtype=pdtype)
    self.encoder = SwitchStack(cfg, is_decoder=False)
    self.decoder = SwitchStack(cfg, is_decoder=True)

  def __call__(self, encoder_ids_BxS, decoder_ids_BxT, encoder_mask_BxS=None,
               train: bool = False):
    memory_BxSxD, encoder_aux = self.encode(encoder_ids_BxS, encoder_mask_BxS, train)
    logits, decoder_aux = self.decode(decoder_ids_BxT, memory_BxSxD, encoder_mask_BxS,
                                      train=train)
    return logits, {"encoder": encoder_aux, "decoder": decoder_aux}

  def encode(self, encoder_ids_BxS, encoder_mask_BxS=None, train: bool = False):
    """(encoder output [B, S, D], encoder aux); encoder_mask_BxS: bool, False at padding."""
    cfg = self.cfg
    table = self.embedding if cfg.tie_embeddings else self.encoder_embedding
    x = jnp.take(table, encoder_ids_BxS, axis=0).astype(jnp.dtype(cfg.dtype))
    mask_BxSxS = None if encoder_mask_BxS is None else jnp.broadcast_to(
        encoder_mask_BxS[:, None, :], (x.shape[0], x.shape[1], x.shape[1]))
    return self.encoder(x, mask_BxSxS, train=train)

  def decode(self, decoder_ids_BxT, memory_BxSxD, encoder_mask_BxS=None, decode: bool = False,
             train: bool = False):
    """(logits [B, T, V] float32, decoder aux) of decoder ids given the encoder output.

    With decode=True the ids extend the cached ones; memory_BxSxD may then be None after the first
    call, which stored its cross-attention keys/values. A decode-mode init sizes the cache: as
    many decoder positions as its decoder ids, the encoder output's length for the memory.
    """
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    table = self.embedding if cfg.tie_embeddings else self.decoder_embedding
    x = jnp.take(table, decoder_ids_BxT, axis=0).astype(dtype)
    b, t = decoder_ids_BxT.shape
    causal_BxTxT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
    cross_mask = None if encoder_mask_BxS is None else jnp.broadcast_to(
        encoder_mask_BxS[:, None, :], (b, t, encoder_mask_BxS.shape[1]))
    x, aux = self.decoder(x, causal_BxTxT, memory_BxSxD, cross_mask, decode=decode, train=train)
    if cfg.tie_embeddings:
      # Mesh TensorFlow's rescale before a tied output projection.
      logits = jnp.dot(x * (cfg.d_model ** -0.5), self.embedding.T.astype(dtype))
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32), aux


def init_switch(cfg: SwitchConfig, rng: jax.Array):
  """(model, params, quant): unboxed params and the `quant` collection at the rules' defaults."""
  model = SwitchTransformer(cfg)
  ids = jnp.zeros((1, 4), jnp.int32)
  # Jitted: eagerly, every initializer and reshape is its own XLA compile (seconds on a CPU).
  variables = nn.meta.unbox(jax.jit(model.init)(rng, ids, ids))
  return model, variables["params"], variables["quant"]


def switch_param_shapes(cfg: SwitchConfig):
  """The params' ShapeDtypeStructs (no arrays allocated)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(SwitchTransformer(cfg).init, jax.random.key(0), ids, ids)
  return nn.meta.unbox(abstract)["params"]


def switch_param_axes(cfg: SwitchConfig):
  """Logical axis names of every parameter (a pytree of PartitionSpec of logical names), as
  transformer.param_axes gives them for the decoder-only model."""
  ids = jnp.zeros((1, 8), jnp.int32)
  abstract = jax.eval_shape(SwitchTransformer(cfg).init, jax.random.key(0), ids, ids)
  return nn.get_partition_spec(abstract)["params"]
