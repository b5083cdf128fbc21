"""Peer rows for the study: Qwix QAT (qwix.QtProvider, int4 / int8 weight rules) on the same model.

Qwix intercepts the ops of a Flax module. Qwix 0.1.8's ragged_dot QAT path quantizes the activations
too and shares one scale across experts, so the peer model runs the numerically equivalent dense expert
path (einsum "td,edf->tef"), where a weight rule gives per-expert, per-output-channel int weights. The
teacher's forward in our step would be intercepted as well, so Qwix rows train with CE only; moeqjax's
own uniform int4 / int8 QAT with CE only is run next to them as the like-for-like reference.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moeqjax.data import sample_batch
from moeqjax.eval import evaluate_variants
from moeqjax.eval.lm_eval import evaluate_lm
from moeqjax.eval.routing_metrics import routing_agreement
from moeqjax.alloc.allocation import achieved
from moeqjax.model import (MoETransformer, default_quant, forward_with_aux, init_ratios,
                           set_expert_codes)
from moeqjax.objectives import token_nll
from moeqjax.pipeline import config as config_io
from moeqjax.train import create_state, jit_train_step, make_optimizer

QTYPES = {"int4": 4, "int8": 8}


def _eval_qwix(model, cfg, params, windows, batch_size, ref_idx):
  @jax.jit
  def fn(p, batch):
    logits, aux = forward_with_aux(model, {"params": p}, batch[:, :-1])
    return jnp.sum(token_nll(logits, batch[:, 1:]), axis=1), aux["expert_idx"]

  total, parts = 0.0, []
  n, seq = windows.shape[0], windows.shape[1] - 1
  for start in range(0, n, batch_size):
    batch = windows[start:start + batch_size]
    real = batch.shape[0]
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    nll, idx = fn(params, jnp.asarray(batch))
    total += float(np.sum(np.asarray(nll)[:real]))
    parts.append(np.asarray(idx)[:, :real * seq])
  agree = routing_agreement(ref_idx, np.concatenate(parts, axis=1), cfg.num_experts)
  return {"bits_per_byte": total / (n * seq) / math.log(2),
          "topk_agree": float(np.mean(agree["topk_agree"]))}


def _train(step_fn, tx, cfg, teacher, quant, tokens, steps, batch_size, seq_len, seed):
  # Fresh buffers every run: the jitted step donates the whole state, quant codes included.
  params = jax.tree.map(jnp.copy, teacher)
  if quant is not None:
    params = init_ratios(cfg, params, quant)
  state = create_state(params, tx, cfg.num_layers,
                       quant=None if quant is None else jax.tree.map(jnp.copy, quant),
                       teacher_params=None)
  for step in range(steps):
    batch = jnp.asarray(sample_batch(tokens, batch_size, seq_len, seed, step))
    state, _ = step_fn(state, batch, jax.random.key(step))
  return state


def _summ(values):
  arr = np.asarray(values, np.float64)
  return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0,
          "n": int(arr.size), "by_seed": arr.tolist()}



def _peer_row(cfg, code: int, results: list[dict], started: float, like_for_like: str) -> dict:
  """One peer-table row: mean ± std over seeds, the bits it stores, and what it compares with."""
  acc = achieved(cfg, np.full((cfg.num_layers, cfg.num_experts), code))
  return {"bits_per_byte": _summ([r["bits_per_byte"] for r in results]),
          "topk_agree": _summ([r["topk_agree"] for r in results]),
          "expert_code_bits": float(code),
          "expert_bits_per_weight": acc["bits_per_weight"],
          "like_for_like": like_for_like,
          "seconds": time.perf_counter() - started}

def run_peer_rows(store, config, cfg, teacher, task, windows, st):
  """Adds `peers` rows to the study store: qwix int4/int8 QAT and moeqjax uniform int4/int8 (CE only)."""
  peers = store.data.setdefault("peers", {})
  try:
    import qwix  # pylint: disable=import-outside-toplevel
  except ImportError:
    peers["qwix"] = {"error": "qwix is not installed (pip install -e '.[peers]')"}
    store.save()
    return
  peers.pop("qwix", None)
  loop, optim = config_io.phase_configs(config.qat, "qat")
  tx = make_optimizer(optim)
  weights = dataclasses.replace(config_io.loss_weights(config), task=1.0, rec=0, kd=0, value=0,
                                struct=0)
  ref_idx = evaluate_lm(cfg, {"params": teacher}, windows, config.eval.batch_size)["expert_idx"]
  dense_cfg = cfg.replace(dispatch="dense")
  seeds = range(st["seeds"])
  for name, code in QTYPES.items():
    row = f"qwix QtProvider {name} (CE only)"
    if row not in peers:
      model = qwix.quantize_model(MoETransformer(dense_cfg), qwix.QtProvider([
          qwix.QtRule(module_path=r".*moe.*", op_names=("einsum",), weight_qtype=name)]))
      step_fn = jit_train_step(model, tx, weights)
      results, t = [], time.perf_counter()
      for seed in tqdm(seeds, desc=row, dynamic_ncols=True):
        state = _train(step_fn, tx, dense_cfg, teacher, None, task.train, st["qat_steps"],
                       loop.batch_size, loop.seq_len, config.qat.seed + 100 * seed)
        results.append(_eval_qwix(model, dense_cfg, state.params, windows, config.eval.batch_size,
                                  ref_idx))
      peers[row] = _peer_row(cfg, code, results, t,
                             f"only with 'moeqjax uniform {name} (CE only)': same model, steps, "
                             "seeds and data; Qwix's own absmax per-channel int grid, dense "
                             "expert path; NOT with the allocation grid (different objective "
                             "and bytes)")
      store.save()
    row = f"moeqjax uniform {name} (CE only)"
    if row not in peers:
      step_fn = jit_train_step(MoETransformer(cfg), tx, weights)
      quant = set_expert_codes(default_quant(cfg),
                                    np.full((cfg.num_layers, cfg.num_experts), code))
      results, t = [], time.perf_counter()
      for seed in tqdm(seeds, desc=row, dynamic_ncols=True):
        state = _train(step_fn, tx, cfg, teacher, quant, task.train, st["qat_steps"],
                       loop.batch_size, loop.seq_len, config.qat.seed + 100 * seed)
        r = evaluate_variants(cfg, {"full_precision": {"params": teacher},
                                    "student": {"params": state.params, "quant": state.quant}},
                              windows, config.eval.batch_size)["student"]
        results.append({"bits_per_byte": r["bits_per_token"], "topk_agree": r["topk_agree"]})
      peers[row] = _peer_row(cfg, code, results, t,
                             f"reference for the qwix {name} row (same objective, steps, seeds)")
      store.save()
