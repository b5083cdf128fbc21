"""Held-out decoder loss (bits per target token), routing and capacity drops of an encoder-decoder on fixed batches."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.eval.routing_metrics import routing_agreement
from moeqjax.model import SwitchConfig, SwitchTransformer
from moeqjax.model.capacity import real_token_drop_rate
from moeqjax.objectives import token_nll
from moeqjax.objectives.seq2seq import STACKS
from moeqjax.train.seq2seq_step import BATCH_KEYS, batch_arrays


@functools.lru_cache(maxsize=None)
def _eval_fn(cfg: SwitchConfig):
  """One compiled function per config; every variant (teacher, RTN, QAT student) reuses it."""
  model = SwitchTransformer(cfg)
  moe = cfg.moe_config()

  def fn(variables, encoder_ids, decoder_ids, targets, target_mask, encoder_mask):  # BATCH_KEYS
    logits, aux = model.apply(variables, encoder_ids, decoder_ids, encoder_mask)
    nll_B = jnp.sum(token_nll(logits, targets) * target_mask, axis=-1)  # per example
    masks = {"encoder": encoder_mask, "decoder": target_mask}
    return nll_B, {s: (aux[s]["expert_idx"], real_token_drop_rate(
        aux[s]["expert_idx"], masks[s], moe.num_experts, capacity_factor=moe.capacity_factor,
        capacity=moe.expert_capacity)) for s in STACKS}

  return jax.jit(fn)


def evaluate_seq2seq(cfg: SwitchConfig, variables: dict, batches) -> dict:
  """Scores the decoder's target tokens on fixed batches (no jitter, no cache).

  The forward masks source padding (encoder_mask) as transformers' attention_mask does, and
  routes every token, padding too, as transformers does; the routing results leave padding out:
  the encoder's tokens where encoder_mask is False and the decoder's where target_mask is False
  (positions that predict nothing), as "token_mask" says.

  Args:
    cfg: the model config.
    variables: {"params": ...} (full precision) or with "quant" codes (fake-quantized student).
    batches: data.Seq2SeqBatch (or dicts with its fields), all of one shape.

  Returns:
    {"nll": nats per target token (target_mask True), "bits_per_token": nll / ln 2,
     "tokens": scored target tokens,
     "bits_per_example": [N] bits per target token of each example (batch order; 0 for an example
       with no target token), for standard errors paired over examples,
     "expert_idx": {"encoder": [L_enc, N*S, 1], "decoder": [L_dec, N*T, 1]} top-1 experts of
       every routed token (batch order), padding included,
     "token_mask": {"encoder": [N*S], "decoder": [N*T]} bool, False at padding (same order),
     "drop_rate": {"encoder": [L_enc], "decoder": [L_dec], "all": float}: the fraction of real
       routed tokens the expert capacity dropped, per sparse layer and pooled over both stacks}.
  """
  fn = _eval_fn(cfg)
  nll, tokens = 0.0, 0
  per_example = []
  idx = {s: [] for s in STACKS}
  drops = {s: [] for s in STACKS}
  token_mask = {s: [] for s in STACKS}
  for batch in batches:
    arrays = batch_arrays(batch)  # the train step's arrays: a missing encoder_mask is all True
    mask = np.asarray(arrays["target_mask"], bool)
    part, routing = fn(variables, *(arrays[k] for k in BATCH_KEYS))
    part = np.asarray(part, np.float64)
    nll += float(part.sum())
    tokens += int(mask.sum())
    per_example.append(part / np.maximum(mask.sum(axis=-1), 1) / math.log(2))
    for s, m in (("encoder", np.asarray(arrays["encoder_mask"], bool)), ("decoder", mask)):
      idx[s].append(np.asarray(routing[s][0]))
      drops[s].append(np.asarray(routing[s][1], np.float64) * m.sum())
      token_mask[s].append(m.reshape(-1))
  if tokens == 0:
    raise ValueError("the evaluation batches have no target token to score (target_mask is all "
                     "False)")
  idx = {s: np.concatenate(idx[s], axis=1) for s in STACKS}
  token_mask = {s: np.concatenate(token_mask[s]) for s in STACKS}
  routed = {s: max(int(token_mask[s].sum()), 1) for s in STACKS}  # real tokens per layer
  # Each batch's per-layer rate weighted by its real tokens: the pooled per-layer rate.
  drop = {s: np.sum(np.stack(drops[s]), axis=0) / routed[s] for s in STACKS}
  pooled = sum(float(np.sum(drop[s])) * routed[s] for s in STACKS) / max(sum(
      drop[s].shape[0] * routed[s] for s in STACKS), 1)
  nll /= tokens
  return {"nll": nll, "bits_per_token": nll / math.log(2), "tokens": tokens,
          "bits_per_example": np.concatenate(per_example), "expert_idx": idx,
          "token_mask": token_mask, "drop_rate": {**drop, "all": pooled}}


def seq2seq_routing_agreement(reference: dict, result: dict, num_experts: int) -> dict:
  """Top-1 agreement of result's routing with reference's (e.g. the teacher's), per sparse layer,
  over real tokens (reference's token_mask; both scored the same batches).

  Args:
    reference, result: evaluate_seq2seq results on the same batches.
    num_experts: E.

  Returns:
    {"encoder": [L_enc], "decoder": [L_dec], "mean": float over every sparse layer}.
  """
  out = {s: routing_agreement(reference["expert_idx"][s], result["expert_idx"][s], num_experts,
                              reference["token_mask"][s])["top1_agree"] for s in STACKS}
  out["mean"] = float(np.mean(np.concatenate([out[s] for s in STACKS])))
  return out
