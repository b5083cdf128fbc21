"""The pipeline's phases for a Switch Transformer config (encoder-decoder, T5 span corruption): pretrain, qat, ptq (rtn, gptq), stats/allocate views, eval."""

# The family is decided from the config (config_io.is_switch: the model section has
# `num_decoder_layers`); the decoder-only phases (pretrain.py, qat.py, ptq.py, evaluate.py,
# stats.py, allocate.py, workdirs.py) hand a Switch config to the functions here. Everything
# else is shared: run_training (with a batches(step) function instead of a token stream), the
# run records (record_config, runs.continue_config, StaleWorkdir), checkpoints and --resume.
#
# Data (Seq2SeqData): span-corruption batches (data.seq2seq.span_corruption_batch) of raw windows
# of seq2seq.window tokens of the corpus' train split, a pure function of (phase seed, step); the
# held-out batches are eval.num_batches fixed batches of the validation split (seed eval.seed).
# With seq2seq.pairs, (source, target) records instead (data.seq2seq.pair_batch).
# Every expert-code table is [L_sparse, E]: the encoder's sparse layers, then the decoder's
# (model.moe_paths).
#
# A Switch run records, beside its sections, the whole config it ran with (runs.DEFAULTS): the
# phases that continue it start from that config when no --config is given.

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moeqjax.alloc.allocation import (AllocationError, achieved, allocation_target,
                                      read_allocation)
from moeqjax.data import TokenCorpus
from moeqjax.data import make_tokenizer
from moeqjax.data.seq2seq import pair_batch, read_pairs, span_corruption_batch, t5_sentinel_ids
from moeqjax.eval import evaluate_seq2seq
from moeqjax.eval.control import control_comparison
from moeqjax.eval.paired import paired_difference
from moeqjax.eval.routing_metrics import routing_agreement, window_agreement
from moeqjax.model import (SwitchTransformer, default_quant, expert_codes,
                           init_ratios, init_switch, set_expert_codes, without_ratios)
from moeqjax.model.moe_paths import at_path, moe_paths, path_name
from moeqjax.objectives import LossWeights
from moeqjax.objectives.seq2seq import STACKS
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline import runs
from moeqjax.pipeline.mesh import run_placement
from moeqjax.pipeline.ptq_calib import CalibBatch, model_hessians
from moeqjax.pipeline.workdirs import finished_state, record_config
from moeqjax.train import (TrainState, batch_arrays, create_state, jit_seq2seq_step,
                           make_optimizer, run_training)
from moeqjax.train.sharding import init_sharded

PRETRAIN_SECTIONS = ("model", "data", "seq2seq", "pretrain", "eval")
STUDENT_SECTIONS = ("model", "quant", "data", "seq2seq", "qat", "loss", "eval")
REFERENCE, CONTROL, STUDENT = "full_precision", "control", "student"  # eval.json's names
UNIT = "target token"


class SwitchPhaseError(config_io.ConfigError):
  """Something a Switch config cannot do (yet), or a Switch section that does not fit."""


# ---- config, records, data


def _record(config, sections) -> tuple[dict, dict]:
  """(the sections a Switch phase records, its DEFAULTS provenance: the whole config)."""
  missing = [s for s in sections if s not in config]
  if missing:
    raise SwitchPhaseError(f"the Switch config has no {', '.join(missing)} section(s); start from "
                           "configs/switch_tiny.py")
  record = {k: config[k].to_dict() for k in sections}
  if record.get("seq2seq", {}).get("pairs"):  # later phases find the pairs from any folder
    record["seq2seq"]["pairs"] = str(pathlib.Path(record["seq2seq"]["pairs"]).absolute())
  return record, {runs.DEFAULTS: config.to_dict()}


def pairs_path(config) -> str:
  """seq2seq.pairs: a .jsonl/.parquet/.arrow/.feather file of (source, target) records to train
  and evaluate on instead of span corruption of the corpus; "" (or absent): span corruption."""
  return str(config.seq2seq.get("pairs", "") or "")


def _loop(config, phase: str):
  loop, optim = config_io.phase_configs(config[phase], phase)
  window = int(config.seq2seq.window)
  if not pairs_path(config) and loop.seq_len != window:
    raise SwitchPhaseError(
        f"{phase}.seq_len={loop.seq_len} must equal seq2seq.window={window} (the raw tokens of "
        f"one span-corrupted example); set both, e.g. --config.{phase}.seq_len={window}")
  return loop, optim


def sentinels(config, cfg) -> list[int]:
  """The span-corruption sentinel ids: seq2seq.num_sentinels down from seq2seq.first_sentinel_id
  (-1, or absent in a run recorded before the field: the top id, model.vocab_size - 1)."""
  first = int(config.seq2seq.get("first_sentinel_id", -1))
  return t5_sentinel_ids(cfg.vocab_size, int(config.seq2seq.num_sentinels), first)


def check_corpus(config, cfg, corpus: TokenCorpus):
  """The corpus' token ids must sit below the sentinels (sentinels(): <extra_id_0> down)."""
  if pairs_path(config):
    return  # pairs are checked when they are read (Seq2SeqData)
  lowest = min(sentinels(config, cfg))
  top = max(int(np.max(corpus.train, initial=0)), int(np.max(corpus.valid, initial=0)))
  if top >= lowest:
    raise SwitchPhaseError(
        f"the data hold token id {top}, but ids from {lowest} up are the "
        f"{config.seq2seq.num_sentinels} span-corruption sentinels (model.vocab_size="
        f"{cfg.vocab_size}, seq2seq.first_sentinel_id={config.seq2seq.get('first_sentinel_id', -1)}"
        "); raise model.vocab_size to the tokenizer's vocabulary + seq2seq.num_sentinels, or "
        "point seq2seq.first_sentinel_id at the tokenizer's <extra_id_0>")


def span_batch(config, cfg, tokens: np.ndarray, batch_size: int, seed: int, step: int):
  """One span-corruption batch (data.Seq2SeqBatch) of seq2seq.window-token windows of `tokens`."""
  s = config.seq2seq
  return span_corruption_batch(tokens, batch_size, int(s.window), seed, step,
                               sentinel_ids=sentinels(config, cfg),
                               decoder_start_id=cfg.decoder_start_token_id,
                               noise_density=float(s.noise_density),
                               mean_span_length=float(s.mean_span_length))


class Seq2SeqData:
  """Where a Switch phase's batches come from: span corruption of the corpus' splits, or, with
  seq2seq.pairs, (source, target) records (data.seq2seq.read_pairs: a record without either
  field is a one-line error), the last data.valid_fraction of them held out, cut and padded to
  seq2seq.source_len / target_len tokens (pad 0, targets end with the tokenizer's end-of-text id
  when it has one)."""

  def __init__(self, config, cfg, corpus: TokenCorpus):
    self.config, self.cfg = config, cfg
    path = pairs_path(config)
    if not path:
      check_corpus(config, cfg, corpus)
      self.train_tokens, self.valid_tokens = corpus.train, corpus.valid
      self.pairs = None
      return
    s = config.seq2seq
    pairs = read_pairs(path, s.get("source_field", "text"), s.get("target_field", "summary"),
                       settings=("--config.seq2seq.source_field",
                                 "--config.seq2seq.target_field"))
    if len(pairs) < 2:
      raise SwitchPhaseError(f"seq2seq.pairs {path} holds {len(pairs)} record(s); training and a "
                             "held-out split need at least 2")
    held = min(max(1, round(len(pairs) * float(config.data.valid_fraction))), len(pairs) - 1)
    self.pairs = {"train": pairs[:-held], "valid": pairs[-held:]}
    tokenizer = make_tokenizer(config.data.tokenizer)
    self.encode = lambda b: np.asarray(tokenizer.encode(b.decode("utf-8", "replace")), np.int64)
    self.eos = getattr(tokenizer, "separator_id", None)
    self.lens = (int(s.get("source_len", 0)), int(s.get("target_len", 0)))
    if min(self.lens) < 1:
      raise SwitchPhaseError("seq2seq.pairs needs seq2seq.source_len and seq2seq.target_len "
                             "(tokens per source and target, >= 1)")

  def batch(self, split: str, batch_size: int, seed: int, step: int):
    if self.pairs is None:
      tokens = self.train_tokens if split == "train" else self.valid_tokens
      return span_batch(self.config, self.cfg, tokens, batch_size, seed, step)
    return pair_batch(self.pairs[split], batch_size, *self.lens, seed, step, encode=self.encode,
                      pad_id=0, decoder_start_id=self.cfg.decoder_start_token_id, eos_id=self.eos)

  def train_batches(self, loop):
    """batches(step) for run_training: the step's batch as the step's dict of arrays."""
    return lambda step: batch_arrays(self.batch("train", loop.batch_size, loop.seed, step))

  def eval_batches(self) -> list:
    """The fixed held-out batches: batch b is batch("valid", eval.batch_size, eval.seed, b)."""
    e = self.config.eval
    return [self.batch("valid", int(e.batch_size), int(e.seed), b)
            for b in range(int(e.num_batches))]


# ---- states


def state_template(config, phase: str, codes=None) -> TrainState:
  """The abstract train state of a Switch "pretrain" or "qat" run (nothing allocated)."""
  cfg = config_io.switch_config(config)
  _, optim = config_io.phase_configs(config[phase], phase)
  tx = make_optimizer(optim)
  quant = default_quant(cfg) if phase == "qat" else None
  if quant is not None and codes is not None and np.ndim(codes) == 3:
    quant = set_expert_codes(quant, codes)

  def build():
    params = init_switch(cfg, jax.random.key(0))[1]
    teacher = without_ratios(params)
    if phase == "qat":
      return create_state(params, tx, None, quant=quant, teacher_params=teacher)
    return create_state(teacher, tx, None)

  return jax.eval_shape(build)


def _compiled_step(cfg, optim, weights):
  """The jitted step, one compile per (model, optimizer, objective). The expert codes are traced
  data and quant.expert_code only fills the default `quant` collection (which the step is always
  given), so runs that differ in it alone (the student, its full-precision control, an allocation)
  share one compile."""
  return _jitted_step(cfg.replace(quant=dataclasses.replace(cfg.quant, expert_code=0)), optim,
                      weights)


@functools.lru_cache(maxsize=4)
def _jitted_step(cfg, optim, weights):
  return jit_seq2seq_step(SwitchTransformer(cfg), make_optimizer(optim), weights)


def _placed(config, cfg, build, batch_size: int, *args):
  """(the state build(*args) makes, its Placement): on one device build's state and None; on
  several, the config's mesh (pipeline.mesh.run_placement) and the state created in its
  shardings."""
  place = run_placement(config, jax.eval_shape(build, *args), batch_size)
  if place is None:
    return build(*args), None
  return init_sharded(build, place.state, *args), place


def _step_for(cfg, optim, weights, place):
  """The compiled step: shared by runs of one (model, optimizer, objective) on one device
  (_compiled_step), compiled for the placement's mesh on several."""
  if place is None:
    return _compiled_step(cfg, optim, weights)
  return jit_seq2seq_step(SwitchTransformer(cfg), make_optimizer(optim), weights,
                          placement=place)


def pretrain(config, workdir: pathlib.Path, corpus: TokenCorpus, *, resume: bool) -> TrainState:
  """Full-precision span-corruption pretraining of the teacher; reuses a finished run."""
  workdir = pathlib.Path(workdir)
  cfg = config_io.switch_config(config)
  loop, optim = _loop(config, "pretrain")
  data = Seq2SeqData(config, cfg, corpus)
  record_config(workdir, *_record(config, PRETRAIN_SECTIONS))
  tx = make_optimizer(optim)
  params = without_ratios(init_switch(cfg, jax.random.key(loop.seed))[1])
  state, place = _placed(config, cfg, lambda p: create_state(p, tx, None), loop.batch_size,
                         params)
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  weights = LossWeights(rec=0, kd=0, value=0, struct=0, lb=config.loss.lb, z=config.loss.z)
  step_fn = _step_for(cfg, optim, weights, place)
  return run_training(state, step_fn, None, loop, workdir, resume=resume, desc="pretrain",
                      batches=data.train_batches(loop), placement=place)


def qat(config, workdir: pathlib.Path, corpus: TokenCorpus, teacher_params, *,
        expert_codes_LxE, resume: bool, init_from: tuple[str, object] | None = None,
        realloc=None, provenance: dict | None = None) -> TrainState:
  """QAT of a Switch student from `teacher_params` (codes [L_sparse, E] or quant.expert_code);
  init_from (name, params), e.g. a `moeqjax ptq --method gptq` student, starts the student there
  instead (the name is recorded in config.json); realloc (qat.ReallocConfig) re-allocates the
  sparse layers' codes every realloc.every steps from the run's own router statistics, as a
  decoder-only run does (progressive_step)."""
  workdir = pathlib.Path(workdir)
  cfg = config_io.switch_config(config)
  loop, optim = _loop(config, "qat")
  weights = config_io.loss_weights(config)
  data = Seq2SeqData(config, cfg, corpus)
  record, defaults = _record(config, STUDENT_SECTIONS)
  record["expert_codes"] = (None if expert_codes_LxE is None
                            else np.asarray(expert_codes_LxE).tolist())
  if init_from is not None:
    record["init_from"] = init_from[0]
  if realloc is not None:
    record["realloc"] = dataclasses.asdict(realloc)
  record_config(workdir, record, {**(provenance or {}), **defaults})
  quant = default_quant(cfg)
  if expert_codes_LxE is not None:
    quant = set_expert_codes(quant, expert_codes_LxE)
  tx = make_optimizer(optim)
  teacher = without_ratios(teacher_params)
  start = init_ratios(cfg, teacher if init_from is None else init_from[1], quant)
  # Separate buffers: the state is donated.
  build = lambda student, codes, fixed: create_state(
      jax.tree.map(jnp.copy, student), tx, None, quant=codes,
      teacher_params=jax.tree.map(jnp.copy, fixed))
  state, place = _placed(config, cfg, build, loop.batch_size, start, quant, teacher)
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  desc = workdir.name if "qat" in workdir.name else f"qat {workdir.name}"
  step_fn = _step_for(cfg, optim, weights, place)
  if realloc is not None:
    step_fn = progressive_step(step_fn, config, realloc)
  return run_training(state, step_fn, None, loop, workdir, resume=resume, desc=desc,
                      batches=data.train_batches(loop), placement=place)


def progressive_step(step_fn, config, realloc, log=None):
  """A Switch QAT step that re-allocates every realloc.every steps: qat.progressive_step over the
  allocation view (the sparse layers as the allocator's layers, encoder first)."""
  from moeqjax.pipeline import qat as qat_mod
  view, _ = allocation_view(config)
  return qat_mod.progressive_step(step_fn, view, realloc, log=log,
                                  params_view=lambda params: allocation_view(config, params)[1])


def read_switch_allocation(config, path) -> np.ndarray:
  """Codes [L_sparse, E] of an allocation.json for this Switch model (a GGUF one is refused)."""
  if allocation_target(path) == "gguf":
    raise AllocationError(f"--allocation {path} is a --target gguf allocation; GGUF has no Switch "
                          "Transformer architecture: allocate per expert (the default target)")
  view, _ = allocation_view(config)
  return read_allocation(path, view.num_layers, view.num_experts)


def qat_from_teacher(config, workdir, teacher_dir, allocation_path, *, resume: bool,
                     init_from=None, realloc=None) -> TrainState:
  """`moeqjax qat` on a Switch config: the teacher's params, the data, an optional allocation.

  With `init_from` (a `moeqjax ptq` workdir) the student starts from that PTQ student, at its codes
  unless an allocation is given (ptq.init_from_student, as for a decoder-only run)."""
  from moeqjax.pipeline.ptq import init_from_student
  from moeqjax.pipeline.workdirs import teacher_inputs
  params, corpus, codes = teacher_inputs(config, teacher_dir, allocation_path)
  start, codes = init_from_student(config, init_from, codes)
  state = qat(config, workdir, corpus, params, expert_codes_LxE=codes, resume=resume,
              init_from=start, realloc=realloc,
              provenance={"teacher": str(pathlib.Path(teacher_dir).absolute())})
  import_hf.keep_hf_config(teacher_dir, workdir)  # an imported teacher's config.json, for export
  return state


def switch_hessians(config, cfg, corpus, teacher, num_batches: int):
  """GPTQ's per-expert Hessians of the teacher over the QAT phase's first `num_batches` training
  batches (Seq2SeqData: span corruption or pairs; qat.batch_size and qat.seed), padding left out."""
  data, loop = Seq2SeqData(config, cfg, corpus), config.qat
  batches = (calib_batch(data.batch("train", loop.batch_size, loop.seed, step))
             for step in range(num_batches))
  return model_hessians(SwitchTransformer(cfg), cfg.moe_config(), teacher, batches,
                        num_batches=num_batches, progress=True)


def calib_batch(batch):
  """A Seq2SeqBatch as GPTQ's calibration batch: the source's and the target's padding do not
  count (nothing reads their outputs)."""
  arrays = batch_arrays(batch)
  return CalibBatch((arrays["encoder_ids"], arrays["decoder_ids"], arrays["encoder_mask"]),
                    {"encoder": arrays["encoder_mask"], "decoder": arrays["target_mask"]})


def ptq_from_teacher(config, workdir: pathlib.Path, teacher_dir, method: str, allocation_path,
                     calib_batches: int):
  """`moeqjax ptq` on a Switch config: the teacher at the codes (round-to-nearest, or GPTQ of the
  sparse layers' experts), read like a finished QAT run (a checkpoint at step qat.steps).

  GPTQ calibrates on `calib_batches` training batches of the QAT phase (Seq2SeqData: span
  corruption or pairs, qat.batch_size and qat.seed, steps 0..calib_batches-1) through the
  teacher's forward; pipeline.ptq_calib and pipeline.ptq.gptq_experts serve both model families.
  """
  from moeqjax.pipeline import ptq as ptq_mod
  from moeqjax.pipeline.workdirs import teacher_inputs
  teacher, corpus, codes_in = teacher_inputs(config, teacher_dir, allocation_path)
  ptq_mod._check(config, None if pairs_path(config) else corpus, method, calib_batches)
  config = ptq_mod.gptq_config(config, method)
  workdir = pathlib.Path(workdir)
  cfg = config_io.switch_config(config)
  loop, optim = _loop(config, "qat")
  quant = default_quant(cfg)
  if codes_in is not None:
    quant = set_expert_codes(quant, codes_in)
  codes = expert_codes(quant)
  record, defaults = _record(config, STUDENT_SECTIONS)
  record["expert_codes"] = None if codes_in is None else codes.tolist()
  record["ptq"] = ptq_mod.ptq_record(method, calib_batches)
  record_config(workdir, record,
                {"teacher": str(pathlib.Path(teacher_dir).absolute()), **defaults})
  build = ptq_mod.student_builder(make_optimizer(optim), None, quant, teacher, loop.steps)
  params = init_ratios(cfg, teacher, quant)
  import_hf.keep_hf_config(teacher_dir, workdir)  # an imported teacher's config.json, for export
  done = ptq_mod.finished_ptq(workdir, build, params, loop.steps)
  if done is not None:
    return done
  report = {"method": method, "expert_codes": codes.tolist()}
  if method == "gptq":
    hessians = switch_hessians(config, cfg, corpus, teacher, calib_batches)
    params = ptq_mod.gptq_student(cfg, params, hessians, codes, report)
  return ptq_mod.save_ptq(workdir, build(jax.tree.map(jnp.copy, params)), report)


# ---- statistics and allocation: the sparse layers as the rows of a decoder-only view


def allocation_view(config, params=None):
  """(ModelConfig, params) that the allocator and the router statistics read: the sparse layers'
  MoE block config (ReLU experts, w_in and w_out) with num_layers = L_sparse, and the params' MoE
  blocks as layers_0 .. layers_{L_sparse-1}, encoder first (model.moe_paths order)."""
  cfg = config_io.switch_config(config)
  num_sparse = len(cfg.encoder_sparse_layers) + len(cfg.decoder_sparse_layers)
  view = dataclasses.replace(cfg.moe_config(), num_layers=num_sparse)
  if params is None:
    return view, None
  paths = moe_paths(params, "router")
  return view, {f"layers_{i}": {"moe": at_path(params, p)} for i, p in enumerate(paths)}


def sparse_layer_names(params) -> list[str]:
  """The rows of every [L_sparse, E] table, e.g. ["encoder/layers_1", "decoder/layers_1"]."""
  return [path_name(p) for p in moe_paths(params, "router")]


# ---- evaluation


def _per_example_agreement(reference: dict, result: dict, num_experts: int, n: int) -> np.ndarray:
  """Top-1 agreement with the reference per example, the mean over every sparse layer (each
  stack's per-example agreement, over the example's real tokens, weighted by its sparse layer
  count)."""
  total, layers = 0.0, 0
  for s in STACKS:
    ref, idx = reference["expert_idx"][s], result["expert_idx"][s]
    if ref.shape[0] == 0:
      continue
    total = total + ref.shape[0] * window_agreement(
        ref, idx, num_experts, n, reference["token_mask"][s])["top1_agree"]
    layers += ref.shape[0]
  return total / layers


per_example_agreement = _per_example_agreement  # the Switch study's paired agreement


def evaluate_run(config, workdir: pathlib.Path, teacher_params, *, control=None,
                 teacher=None) -> dict:
  """`moeqjax eval` on a Switch config: teacher, student (and --control) on the fixed held-out
  span-corruption batches; writes workdir/eval.json and returns {name: metrics}
  (evaluate_variants' fields; the student's also has layer_names)."""
  from moeqjax.pipeline.evaluate import control_config, restore_qat_state
  from moeqjax.pipeline.workdirs import load_data
  workdir = pathlib.Path(workdir)
  cfg = config_io.switch_config(config)
  state = restore_qat_state(config, workdir)
  data = Seq2SeqData(config, cfg, load_data(config))
  batches = data.eval_batches()
  variants = {REFERENCE: {"params": teacher_params}}
  if control is not None:
    ctl = restore_qat_state(control_config(config, workdir, control, teacher), control)
    variants[CONTROL] = {"params": init_ratios(cfg, ctl.params, ctl.quant), "quant": ctl.quant}
  variants[STUDENT] = {"params": state.params, "quant": state.quant}
  results = evaluate_variants(config, variants, batches,
                              control=CONTROL if control is not None else None)
  results[STUDENT]["layer_names"] = sparse_layer_names(state.params)
  if data.pairs is not None:
    add_rouge(config, data, variants, results, control=CONTROL if control is not None else None)
  (workdir / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
  return results


def add_rouge(config, data: Seq2SeqData, variants: dict, results: dict, *,
              control: str | None = None):
  """ROUGE-1/2/Lsum of every variant's greedy summaries of the held-out pairs (the first
  eval.rouge_examples, default 64; at most seq2seq.target_len new tokens), into results[name]
  ["rouge"], with each difference vs the teacher (and the control) paired over examples.

  Without Google's rouge-score (the `data` extra) results[name]["rouge"] says why instead."""
  from moeqjax.eval.rouge import ROUGE_TYPES, rouge_eval
  from moeqjax.pipeline.serve import switch_text
  cfg = data.cfg
  tokenizer = make_tokenizer(config.data.tokenizer)
  limit = int(config.eval.get("rouge_examples", 64))
  held = data.pairs["valid"][:limit]
  examples = [(data.encode(src)[:data.lens[0]].tolist() or [0], tgt.decode("utf-8", "replace"))
              for src, tgt in held]
  scored = {}
  for name, v in variants.items():
    try:
      scored[name] = rouge_eval(cfg, v, examples, lambda ids: switch_text(tokenizer, cfg.vocab_size,
                                                                          ids),
                                max_new_tokens=data.lens[1], eos_id=data.eos,
                                batch_size=int(config.eval.batch_size))
    except ImportError as e:
      for r in results.values():
        r["rouge"] = {"skipped": str(e).splitlines()[0]}
      return
  per = {name: {t: np.asarray([e[t] for e in r["per_example"]]) for t in ROUGE_TYPES}
         for name, r in scored.items()}
  for name, r in scored.items():
    out = {t: float(r[t]) for t in ROUGE_TYPES}
    out["examples"] = len(examples)
    for ref, label in ((REFERENCE, "teacher"), (control, "control")):
      if ref is None or name == ref:
        continue
      for t in ROUGE_TYPES:
        out[f"{t}_delta_vs_{label}"], out[f"{t}_delta_vs_{label}_se"] = paired_difference(
            per[name][t], per[ref][t])
    results[name]["rouge"] = out


def evaluate_variants(config, variants: dict, batches, *, control: str | None = None) -> dict:
  """Every variant on the held-out `batches` (Seq2SeqData.eval_batches), against REFERENCE (the
  teacher, the first of `variants`) and `control` (a name among them, or None).

  Per variant: bits per target token, Δ vs the teacher (and vs the control) paired over held-out
  examples with its standard error, top-1 routing agreement with the teacher (mean over every
  sparse layer, and per layer), the capacity drop rate (pooled and per layer) and expert bits
  per weight. With a control, every other variant also gets the control's agreement and the
  quantization-only drift (variant - control, paired over examples).

  Args:
    config: the Switch config.
    variants: name -> variables ({"params"}, plus "quant" for a quantized one); REFERENCE first.
    batches: the held-out data.Seq2SeqBatch list.
    control: the full-precision control's name in `variants`, or None.
  """
  cfg = config_io.switch_config(config)
  raw = {name: evaluate_seq2seq(cfg, v, batches)
         for name, v in tqdm(variants.items(), desc="eval", dynamic_ncols=True)}
  n = len(raw[REFERENCE]["bits_per_example"])
  windows = {}
  for name, r in raw.items():
    agree = _per_example_agreement(raw[REFERENCE], r, cfg.num_experts, n)
    windows[name] = {"bits": r["bits_per_example"], "top1_agree": agree, "topk_agree": agree}
  compared = control_comparison(windows, teacher=REFERENCE, control=control)
  view, _ = allocation_view(config)
  results = {}
  for name, r in raw.items():
    quant = variants[name].get("quant")
    codes = (np.zeros((view.num_layers, view.num_experts), np.int32) if quant is None
             else expert_codes(quant, view.num_layers))
    memory = achieved(view, codes)
    per_layer = {s: [] for s in STACKS}
    for s in STACKS:
      if r["expert_idx"][s].shape[0]:
        per_layer[s] = routing_agreement(raw[REFERENCE]["expert_idx"][s], r["expert_idx"][s],
                                         cfg.num_experts)["top1_agree"].tolist()
    out = {
        "unit": UNIT,
        "nll": r["nll"],
        "bits_per_token": r["bits_per_token"],
        "eval_tokens": r["tokens"],
        "eval_examples": n,
        "drop_rate": r["drop_rate"]["all"],
        "drop_rate_per_layer": {s: np.asarray(r["drop_rate"][s]).tolist() for s in STACKS},
        "top1_agree": float(np.mean(windows[name]["top1_agree"])),
        "topk_agree": float(np.mean(windows[name]["top1_agree"])),  # top-1 routing: k = 1
        "top1_agree_per_layer": per_layer,
        "expert_bytes": memory["bytes"],
        "expert_bits_per_weight": memory["bits_per_weight"],
        "expert_code_bits": memory["code_bits"],
        "expert_codes": codes.tolist(),
    }
    out["delta_vs_fp"], out["delta_vs_fp_se"] = paired_difference(
        r["bits_per_example"], raw[REFERENCE]["bits_per_example"])
    for key, value in compared.get(name, {}).items():
      out.setdefault(key, value)
    results[name] = out
  return results


def _se(x) -> str:
  return "" if x is None else f" ± {x:.4f}"


def format_summary(results: dict, workdir: pathlib.Path) -> str:
  """The eval summary: bits, Δ (± paired s.e.), agreement, drift, drops, expert bits."""
  lines = [f"{'variant':16s} {'bits/target token':>17s} {'expert b/w':>10s} {'top-1 agree':>11s} "
           f"{'capacity drops':>14s}"]
  for name, r in results.items():
    lines.append(f"{name:16s} {r['bits_per_token']:17.4f} {r['expert_bits_per_weight']:10.3f} "
                 f"{r['top1_agree']:11.3f} {r['drop_rate']:14.2%}")
  lines.append("")
  for name, r in results.items():
    if name == REFERENCE:
      continue
    text = (f"{name}: Δ bits/target token vs teacher {r['delta_vs_teacher']:+.4f}"
            f"{_se(r['delta_vs_teacher_se'])}")
    if "delta_vs_control" in r:
      text += (f", vs control {r['delta_vs_control']:+.4f}{_se(r['delta_vs_control_se'])}; "
               f"top-1 agreement with the teacher {r['top1_agree']:.3f} (control "
               f"{r['control_top1_agree']:.3f}): quantization-only drift "
               f"{r['drift_top1']:+.4f}{_se(r['drift_top1_se'])}")
    lines.append(text)
  rouge = {name: r["rouge"] for name, r in results.items() if "rouge" in r}
  if rouge:
    lines.append("")
    skipped = next((r["skipped"] for r in rouge.values() if "skipped" in r), None)
    if skipped:
      lines.append(f"ROUGE not computed: {skipped}")
    else:
      for name, r in rouge.items():
        text = (f"{name}: ROUGE-1 {r['rouge1']:.4f}, ROUGE-2 {r['rouge2']:.4f}, ROUGE-Lsum "
                f"{r['rougeLsum']:.4f}")
        if "rougeLsum_delta_vs_teacher" in r:
          text += (f"; ROUGE-Lsum vs teacher {r['rougeLsum_delta_vs_teacher']:+.4f}"
                   f"{_se(r['rougeLsum_delta_vs_teacher_se'])}")
        lines.append(text)
      lines.append(f"(greedy summaries of {next(iter(rouge.values()))['examples']} held-out pairs; "
                   "F-measures, differences paired over examples)")
  n = next(iter(results.values()))["eval_examples"]
  kind = "pair" if "rouge" in next(iter(results.values())) else "span-corruption"
  lines.append(f"(paired standard errors over {n} held-out {kind} examples; capacity "
               "drops: the share of routed tokens over model.expert_capacity, every sparse layer)")
  lines.append(f"\nresults in {workdir}")
  return "\n".join(lines)
