"""Top-k gating from router logits, and the router's auxiliary losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_gates(logits_TxE: jax.Array, top_k: int, norm_topk_prob: bool):
  """Softmax over experts, then the top-k experts per token.

  Mixtral's "top-k on logits, then softmax over the k" equals softmax-then-top-k with
  renormalisation, so one rule with a flag covers Mixtral, Qwen-MoE, OLMoE and Switch (k=1).

  Args:
    logits_TxE: router logits.
    top_k: experts per token.
    norm_topk_prob: renormalise the k gate values to sum to one.

  Returns:
    (probs_TxE, gates_TxK, idx_TxK): full routing probabilities, gate weights and expert ids.
  """
  probs = jax.nn.softmax(logits_TxE.astype(jnp.float32), axis=-1)
  gates, idx = jax.lax.top_k(probs, top_k)
  if norm_topk_prob:
    gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
  return probs, gates, idx


def load_balance_loss(probs_TxE: jax.Array, idx_TxK: jax.Array) -> jax.Array:
  """Switch-Transformer balance loss E * sum_s f_s * P_s (1.0 when perfectly balanced).

  f_s is the fraction of the T*k assignments that went to expert s, P_s the mean
  routing probability of s.

  Scale: this is 1/k of the Hugging Face convention (transformers' load_balancing_loss_func,
  used with `router_aux_loss_coef` by Mixtral / Qwen-MoE / OLMoE), which divides the counts by
  T instead of T*k, so its balanced value is k. HF also pools every layer's rows into one loss,
  while the joint objective averages the per-layer values. So `loss.lb` = c matches an HF
  `router_aux_loss_coef` of c / k (one layer; near balance for several).
  """
  num_experts = probs_TxE.shape[-1]
  counts = jnp.sum(jax.nn.one_hot(idx_TxK, num_experts, dtype=jnp.float32), axis=(0, 1))
  frac = counts / idx_TxK.size
  return num_experts * jnp.sum(frac * jnp.mean(probs_TxE, axis=0))


def router_z_loss(logits_TxE: jax.Array) -> jax.Array:
  """ST-MoE router z-loss: mean squared log-partition of the router logits."""
  return jnp.mean(jnp.square(jax.nn.logsumexp(logits_TxE.astype(jnp.float32), axis=-1)))


def switch_router_losses(router_logits_LxBxSxE: jax.Array, token_mask_BxS=None):
  """Hugging Face Switch's router losses of one stack (encoder or decoder): (z_loss, aux_loss).

  transformers pools every sparse layer's tokens of a sequence together: z_loss is the mean
  squared logsumexp over all of them, and aux_loss = E^2 * mean over (sequence b, expert e) of
  f[b, e] * P[b, e], with f the fraction of b's tokens (all sparse layers) whose argmax expert is
  e (before any capacity drop) and P their mean routing probability of e.

  Args:
    router_logits_LxBxSxE: the stack's router logits, stacked over its sparse layers.
    token_mask_BxS: bool, the tokens to count (False: padding); None counts every token, as
      transformers does (its Switch losses count padding too).
  """
  num_layers, b, s, e = router_logits_LxBxSxE.shape
  logits_BxMxE = jnp.swapaxes(router_logits_LxBxSxE, 0, 1).reshape(b, num_layers * s, e)
  logits_BxMxE = logits_BxMxE.astype(jnp.float32)
  onehot_BxMxE = jax.nn.one_hot(jnp.argmax(logits_BxMxE, axis=-1), e)
  probs_BxMxE = jax.nn.softmax(logits_BxMxE, axis=-1)
  lse2_BxM = jnp.square(jax.nn.logsumexp(logits_BxMxE, axis=-1))
  if token_mask_BxS is None:
    z_loss = jnp.mean(lse2_BxM)
    frac_BxE, prob_BxE = jnp.mean(onehot_BxMxE, axis=1), jnp.mean(probs_BxMxE, axis=1)
  else:  # the same tokens in every layer, as the logits are laid out: layer-major per sequence
    w_BxM = jnp.tile(token_mask_BxS.astype(jnp.float32), (1, num_layers))
    count_Bx1 = jnp.maximum(jnp.sum(w_BxM, axis=1, keepdims=True), 1.0)
    z_loss = jnp.sum(lse2_BxM * w_BxM) / jnp.maximum(jnp.sum(w_BxM), 1.0)
    frac_BxE = jnp.einsum("bme,bm->be", onehot_BxMxE, w_BxM) / count_Bx1
    prob_BxE = jnp.einsum("bme,bm->be", probs_BxMxE, w_BxM) / count_Bx1
  return z_loss, e**2 * jnp.mean(frac_BxE * prob_BxE)
