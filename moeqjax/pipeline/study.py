"""`moeqjax study`: allocation method x QAT objective grid at equal expert weight bytes, with seeds and a Pareto sweep."""

# Protocol (written into study.md):
#   1. pretrain the full-precision model on the pretraining slice (cached in WORKDIR/pretrain);
#   2. fine-tune it in full precision on the task slice; the jitted step collects router statistics
#      (Lambda = router norm change over this fine-tune, counts, gates, V_s) (cached in WORKDIR/finetune_N);
#   3. allocate with every method at each budget from those statistics (random: one order per seed);
#   4. QAT on the task slice from the fine-tuned model (the frozen teacher) for every cell, one compiled
#      step per objective, reused across methods and seeds by swapping the codes (they are data);
#   5. evaluate on the task slice's held-out files: bits per byte, routing agreement vs the teacher;
#   6. per objective, a full-precision control: step 4 with every expert at code 0 (same objective,
#      steps and batches), so that each cell is read against the teacher and against the control.
# Every finished cell is stored in WORKDIR/study.json at once, so a killed study resumes where it was.

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moeqjax.alloc import allocation as alloc_mod
from moeqjax.data import TextCorpus, eval_windows, sample_batch, stdlib_files, stdlib_root
from moeqjax.data.corpus import _corpus_from_documents  # pylint: disable=protected-access
from moeqjax.eval import evaluate_lm, evaluate_variants
from moeqjax.model import MoETransformer, default_quant, init_ratios, set_expert_codes
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import study_peers, study_ptq, study_report
from moeqjax.pipeline.pretrain import pretrain
from moeqjax.pipeline.study_summary import summarize
from moeqjax.pipeline.workdirs import finished_state, record_config
from moeqjax.train import LoopConfig, create_state, jit_train_step, make_optimizer, run_training

TOP_LEVEL = "<top-level>"
# Per-window values a cell and a control keep, for the summary's paired comparisons.
WINDOW_KEYS = ("bits_per_window", "topk_agree_per_window", "top1_agree_per_window")


def slice_corpus(packages, valid_fraction: float) -> TextCorpus:
  """The stdlib files under `packages` (top-level folder names; TOP_LEVEL = files with no folder)."""
  root = stdlib_root()
  wanted = set(packages)
  paths = [p for p in stdlib_files(root)
           if (("/" not in p and TOP_LEVEL in wanted) or p.split("/")[0] in wanted)]
  if not paths:
    raise config_io.ConfigError(f"no stdlib files under {sorted(wanted)}; check data.*_packages")
  docs = [(p, (root / p).read_bytes()) for p in paths]
  return _corpus_from_documents(docs, valid_fraction, f"stdlib slice {','.join(packages)}")


def _settings(config, quick: bool) -> dict:
  s = config.study.to_dict()
  out = {"methods": tuple(s["methods"]), "objectives": dict(s["objectives"]),
         "seeds": int(s["seeds"]), "budget_unit": s["budget_unit"],
         "main_budget": float(s["main_budget"]),
         "pareto_budgets": tuple(float(b) for b in s["pareto_budgets"]),
         "choices": tuple(int(c) for c in s["choices"]),
         "levels": tuple(int(c) for c in s["levels"]), "qat_steps": int(config.qat.steps),
         "finetune_steps": int(s["finetune_steps"]), "peers": bool(s["peers"]), "quick": quick}
  # Post-training rows (study_ptq): only in the settings when asked for, so that studies without
  # them keep their fingerprint (and their finished cells).
  if s.get("ptq"):
    out.update(ptq=tuple(s["ptq"]), ptq_calib_batches=int(s.get("ptq_calib_batches", 8)))
  if quick:
    q = s["quick"]
    out.update(seeds=int(q["seeds"]), pareto_budgets=tuple(float(b) for b in q["pareto_budgets"]),
               qat_steps=int(q["qat_steps"]), finetune_steps=int(q["finetune_steps"]),
               peers=bool(q["peers"]))
    out["objectives"] = {k: out["objectives"][k] for k in q["objectives"]}
  return out


def _cell_key(objective, method, budget, seed) -> str:
  return f"{objective}|{method}|{budget:g}|{seed}"


class _Store:
  """study.json, rewritten atomically after every finished cell."""

  def __init__(self, path: pathlib.Path, meta: dict):
    self.path = path
    self.data = {"meta": meta, "cells": {}, "peers": {}, "controls": {}}
    if path.exists():
      old = json.loads(path.read_text())
      # Trained results belong to the config that made them (the controls too: they are trained
      # with the cells' objectives and steps).
      owned = ("cells", "peers", "controls")
      if old.get("meta", {}).get("fingerprint") == meta["fingerprint"]:
        for key in owned:
          self.data[key] = old.get(key, {})
      self.data.update({k: v for k, v in old.items() if k not in ("meta", *owned)})

  def save(self):
    tmp = self.path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(self.data, indent=1) + "\n")
    os.replace(tmp, self.path)


def _finetune(config, workdir: pathlib.Path, corpus: TextCorpus, params, steps: int,
              replicate: int = 0):
  """Full-precision fine-tune on the task slice; the state's stats are the allocation's input.

  replicate > 0: an independent repeat (other batches), whose Lambda shows Lambda's own noise.
  """
  cfg = config_io.model_config(config)
  _, optim = config_io.phase_configs(config.qat, "qat")
  optim = dataclasses.replace(optim, learning_rate=float(config.study.finetune_learning_rate))
  loop = LoopConfig(steps=steps, batch_size=config.qat.batch_size, seq_len=config.qat.seq_len,
                    seed=config.qat.seed + 1000 + 7919 * replicate, log_every=config.qat.log_every,
                    ckpt_every=0)
  record_config(workdir, {"model": config.model.to_dict(), "data": config.data.to_dict(),
                               "pretrain": config.pretrain.to_dict(), "qat": config.qat.to_dict(),
                               "finetune": {"steps": steps, "lr": optim.learning_rate,
                                            "replicate": replicate, "seed": loop.seed}})
  tx = make_optimizer(optim)
  state = create_state(jax.tree.map(jnp.copy, params), tx, cfg.num_layers)
  done = finished_state(workdir, state, steps)
  if done is not None:
    return done
  model = MoETransformer(cfg)
  weights = config_io.loss_weights(config)
  weights = dataclasses.replace(weights, rec=0, kd=0, value=0, struct=0)
  step_fn = jit_train_step(model, tx, weights)
  return run_training(state, step_fn, corpus.train, loop, workdir, resume=True,
                      desc=f"fine-tune {replicate + 1} (fp, stats)")


def _qat_cell(step_fn, tx, cfg, teacher, quant, codes, tokens, steps, batch_size, seq_len, seed):
  quant = set_expert_codes(quant, codes)
  state = create_state(init_ratios(cfg, jax.tree.map(jnp.copy, teacher), quant), tx, cfg.num_layers,
                       quant=jax.tree.map(jnp.copy, quant),
                       teacher_params=jax.tree.map(jnp.copy, teacher))
  rng = jax.random.key(seed)
  loss = float("nan")
  for step in range(steps):
    batch = jnp.asarray(sample_batch(tokens, batch_size, seq_len, seed, step))
    state, metrics = step_fn(state, batch, jax.random.fold_in(rng, step))
  loss = float(metrics["train/loss"])
  return state, loss


def run_study(config, workdir: pathlib.Path, *, quick: bool, config_path: str = "") -> dict:
  """Runs (or resumes) the study into `workdir`; returns the study.json dict."""
  t_start = time.perf_counter()
  workdir.mkdir(parents=True, exist_ok=True)
  st = _settings(config, quick)
  cfg = config_io.model_config(config)
  qat_cfg = config_io.phase_configs(config.qat, "qat")
  for m in st["methods"]:
    if m not in alloc_mod.METHODS:
      raise config_io.ConfigError(f"study.methods has {m!r}; use {', '.join(alloc_mod.METHODS)}")

  pre_corpus = slice_corpus(config.data.pretrain_packages, config.data.valid_fraction)
  task = slice_corpus(config.data.task_packages, config.data.valid_fraction)
  teacher0 = pretrain(config, workdir / "pretrain", pre_corpus, resume=True).params
  ft = _finetune(config, workdir / f"finetune_{st['finetune_steps']}", task, teacher0,
                 st["finetune_steps"])
  teacher = ft.params
  stats = jax.device_get(ft.stats)
  s = alloc_mod.expert_stats(teacher, stats, cfg.num_layers)
  # An independent second fine-tune (other batches) from the same start: how far its Lambda and the
  # allocations read from it agree with the first one's is Lambda's own noise. The cells use the first.
  ft2 = _finetune(config, workdir / f"finetune_{st['finetune_steps']}_replicate_1", task, teacher0,
                  st["finetune_steps"], replicate=1)
  stats2 = jax.device_get(ft2.stats)
  s2 = alloc_mod.expert_stats(ft2.params, stats2, cfg.num_layers)
  err = alloc_mod.quant_error_table(teacher, cfg, st["choices"])
  windows = eval_windows(task.valid, config.eval.seq_len, config.eval.num_windows)

  fingerprint = json.dumps({k: config[k].to_dict() for k in ("model", "quant", "data", "pretrain",
                                                              "qat", "loss", "eval")},
                           sort_keys=True, default=str) + json.dumps(st, sort_keys=True, default=str)
  meta = {"fingerprint": fingerprint, "settings": st, "config_path": config_path,
          "pretrain_slice": list(config.data.pretrain_packages),
          "task_slice": list(config.data.task_packages),
          "pretrain_corpus": pre_corpus.fingerprint, "task_corpus": task.fingerprint,
          "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                     f"{platform.platform()}, jax {jax.__version__}, {jax.devices()[0].platform}"}
  store = _Store(workdir / "study.json", meta)
  cells_before = len(store.data["cells"])
  store.data["command"] = ("moeqjax study --config " + (config_path or "configs/study_tiny.py")
                           + (" --quick" if quick else ""))
  # Reference (no quantization) and the statistics the allocations used.
  # The teacher's scores on the eval windows, shared by every cell's comparison with it.
  teacher_eval = evaluate_lm(cfg, {"params": teacher}, windows, config.eval.batch_size)

  def evaluate_student(state):
    # Per-window values too: the summary pairs each cell with its control over the windows.
    return evaluate_variants(cfg, {"full_precision": {"params": teacher},
                                   "student": {"params": state.params, "quant": state.quant}},
                             windows, config.eval.batch_size, reference_eval=teacher_eval,
                             per_window=True)["student"]

  ref = evaluate_variants(cfg, {"full_precision": {"params": teacher}}, windows,
                          config.eval.batch_size, reference_eval=teacher_eval)["full_precision"]
  pre_ref = evaluate_variants(cfg, {"full_precision": {"params": teacher0}}, windows,
                              config.eval.batch_size)["full_precision"]
  store.data["reference"] = {"finetuned_fp_bits_per_byte": ref["bits_per_token"],
                             "pretrained_fp_bits_per_byte": pre_ref["bits_per_token"],
                             "eval_tokens": ref["eval_tokens"],
                             "bits_per_window": teacher_eval["bits_per_window"].tolist()}
  store.data["stats"] = {k: (np.asarray(v).tolist() if not isinstance(v, int) else v)
                         for k, v in s.items()}
  store.data["lambda_replicate"] = {"lambda": s2["lambda"].tolist(),
                                    "router_norm_now": s2["router_norm_now"].tolist()}
  store.data["quant_error"] = {"choices": list(st["choices"]), "err_LxExC": err.tolist()}

  # Allocations (deterministic; recomputed on resume).
  budgets = sorted(set((st["main_budget"],) + st["pareto_budgets"]))
  allocs = {}
  for b in budgets:
    for m in st["methods"]:
      for seed in range(st["seeds"]):
        if m != "random" and seed > 0:
          allocs[(m, b, seed)] = allocs[(m, b, 0)]
          continue
        levels = st["levels"] if m in alloc_mod.RULE_METHODS else None
        allocs[(m, b, seed)] = alloc_mod.allocate(m, cfg, teacher, stats, b, st["budget_unit"],
                                                  choices=st["choices"], seed=seed, err_LxExC=err,
                                                  levels=levels)
  store.data["allocations"] = {f"{m}|{b:g}|{seed}": {"codes_LxE": a.codes_LxE.tolist(),
                                                      **a.achieved, "budget_bytes": a.budget_bytes}
                               for (m, b, seed), a in allocs.items()}
  # The statistics-driven allocations again from the replicate fine-tune (its params and stats).
  err2 = alloc_mod.quant_error_table(ft2.params, cfg, st["choices"])
  store.data["replicate_allocations"] = {
      f"{m}|{b:g}": alloc_mod.allocate(
          m, cfg, ft2.params, stats2, b, st["budget_unit"],
          choices=st["choices"], err_LxExC=err2,
          levels=st["levels"] if m in alloc_mod.RULE_METHODS else None).codes_LxE.tolist()
      for b in budgets for m in st["methods"] if m not in ("uniform", "random")}
  store.save()

  if st.get("ptq"):
    study_ptq.run_ptq_rows(store, config, cfg, teacher, task, windows, st, allocs, budgets,
                           teacher_eval)

  base_weights = config_io.loss_weights(config)
  loop, optim = qat_cfg
  tx = make_optimizer(optim)
  model = MoETransformer(cfg)
  quant = default_quant(cfg)

  step_fns = {}

  def objective_step(objective):
    if objective not in step_fns:  # one compile per objective, reused for all cells and controls
      weights = dataclasses.replace(base_weights, **st["objectives"][objective])
      step_fns[objective] = jit_train_step(model, tx, weights)
    return step_fns[objective]

  def run_cells(objective, cells, desc):
    todo = [c for c in cells if _cell_key(objective, *c) not in store.data["cells"]]
    if not todo:
      return
    step_fn = objective_step(objective)
    for method, budget, seed in tqdm(todo, desc=desc, dynamic_ncols=True):
      a = allocs[(method, budget, seed)]
      t = time.perf_counter()
      state, loss = _qat_cell(step_fn, tx, cfg, teacher, quant, a.codes_LxE, task.train,
                              st["qat_steps"], loop.batch_size, loop.seq_len,
                              config.qat.seed + 100 * seed)
      r = evaluate_student(state)
      store.data["cells"][_cell_key(objective, method, budget, seed)] = {
          "objective": objective, "method": method, "budget": budget, "seed": seed,
          "bits_per_byte": r["bits_per_token"], "topk_agree": r["topk_agree"],
          "top1_agree": r["top1_agree"], "changed_frac": r["changed_frac"],
          "topk_agree_per_layer": r["topk_agree_per_layer"], "load_kl": r["load_kl"],
          "expert_bytes": r["expert_bytes"], "expert_bits_per_weight": r["expert_bits_per_weight"],
          "expert_code_bits": r["expert_code_bits"], "final_train_loss": loss,
          **{k: r[k] for k in WINDOW_KEYS}, "seconds": time.perf_counter() - t}
      store.save()

  def run_control(objective):
    # The same-objective control: the cells' QAT (this objective's loss, KD and routing terms
    # included; the same steps, batches and rng per seed) with every expert at full precision.
    controls = store.data["controls"]
    if objective in controls:
      return
    step_fn, fp_codes = objective_step(objective), np.zeros((cfg.num_layers, cfg.num_experts))
    by_seed, t = {}, time.perf_counter()
    for seed in tqdm(range(st["seeds"]), desc=f"control {objective}", dynamic_ncols=True):
      state, loss = _qat_cell(step_fn, tx, cfg, teacher, quant, fp_codes, task.train,
                              st["qat_steps"], loop.batch_size, loop.seq_len,
                              config.qat.seed + 100 * seed)
      r = evaluate_student(state)
      by_seed[str(seed)] = {"bits_per_byte": r["bits_per_token"], "topk_agree": r["topk_agree"],
                            "top1_agree": r["top1_agree"], "final_train_loss": loss,
                            **{k: r[k] for k in WINDOW_KEYS}}
    controls[objective] = {
        "objective": objective, "by_seed": by_seed, "seconds": time.perf_counter() - t,
        "what": f"full precision (every expert at code 0), {st['qat_steps']} steps of the "
                f"'{objective}' QAT objective from the teacher, the same batches and rng as "
                "the QAT cells of each seed"}
    store.save()

  main = st["main_budget"]
  grid = [(m, main, seed) for m in st["methods"] for seed in range(st["seeds"])]
  for objective in st["objectives"]:
    run_cells(objective, grid, f"grid {objective} @ {main:g}")
    run_control(objective)
  summary = summarize(store.data)
  best_obj = summary["best_objective_at_main"]
  pareto = [(m, b, seed) for b in st["pareto_budgets"] for m in st["methods"]
            for seed in range(st["seeds"])]
  run_cells(best_obj, pareto, f"pareto {best_obj}")

  if st["peers"]:
    study_peers.run_peer_rows(store, config, cfg, teacher, task, windows, st)

  store.data["summary"] = summarize(store.data)
  store.data["wall_seconds_this_invocation"] = time.perf_counter() - t_start
  store.data.setdefault("invocations", []).append(
      {"seconds": store.data["wall_seconds_this_invocation"],
       "new_cells": len(store.data["cells"]) - cells_before})
  store.save()
  study_report.write_outputs(workdir, store.data)
  return store.data
