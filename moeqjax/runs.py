"""Training phases as library calls: full-precision pretraining and QAT from a pretrained teacher."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moeqjax import config_io
from moeqjax.data import TokenCorpus, check_vocab, encode_corpus, load_corpus, make_tokenizer
from moeqjax.model import MoETransformer, init_model
from moeqjax.objectives import LossWeights
from moeqjax.quant import validate_codes
from moeqjax.train import (Checkpointer, TrainState, create_state, jit_train_step, make_optimizer,
                           run_training)

_CONFIG_RECORD = "config.json"


class StaleWorkdir(config_io.ConfigError):
  """A workdir made with a different config than the one now given."""


def load_data(config, process_index: int | None = None,
              process_count: int | None = None) -> TokenCorpus:
  """Loads `config.data` and tokenizes it for `config.model`.

  Args:
    config: the experiment config; uses data.path, data.valid_fraction, data.text_field,
      data.tokenizer ("" = bytes, else a folder with tokenizer.json) and model.vocab_size.
    process_index, process_count: this host's shard of the train documents (see
      moeqjax.data.load_corpus); None means jax.process_index() / jax.process_count(), which
      is (0, 1) on a single host, where nothing changes.

  Returns:
    The train / validation token streams; `.unit` is "byte" or "token" for reports.
  """
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  tokenizer = make_tokenizer(config.data.tokenizer)
  # Check the vocab before reading (and tokenizing) a possibly large corpus.
  vocab_size = config_io.model_config(config).vocab_size
  check_vocab(tokenizer, vocab_size)
  corpus = load_corpus(config.data.path or None, config.data.valid_fraction,
                       config.data.text_field, process_index=process_index,
                       process_count=process_count)
  return encode_corpus(corpus, tokenizer, vocab_size)


def record_config(workdir: pathlib.Path, section: dict):
  """Writes the config a phase ran with, or checks it matches the one recorded before."""
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / _CONFIG_RECORD
  text = json.dumps(section, indent=2, sort_keys=True, default=str)
  if path.exists():
    before = json.loads(path.read_text())
    now = json.loads(text)
    if before != now:
      changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
      raise StaleWorkdir(
          f"{workdir} was made with a different config (sections differ: {', '.join(changed)}); "
          "choose another --workdir or delete this one")
    return
  path.write_text(text + "\n")


def latest_state(workdir: pathlib.Path, template: TrainState, steps: int | None = None):
  """The latest state in workdir/ckpt restored into `template`, or None when there is none
  (or, with `steps`, when the latest checkpoint is not at that step)."""
  ckpt = Checkpointer(pathlib.Path(workdir) / "ckpt", every=0)
  try:
    latest = ckpt.latest_step()
    if latest is None or (steps is not None and latest != steps):
      return None
    return ckpt.restore(template, latest)
  finally:
    ckpt.close()


def finished_state(workdir: pathlib.Path, template: TrainState, steps: int):
  """The final state of a phase that already ran to `steps`, or None."""
  return latest_state(workdir, template, steps)


def state_template(config, phase: str) -> TrainState:
  """The abstract (shape-only) train state of a "pretrain" or "qat" run, to restore into.

  Nothing is allocated (jax.eval_shape).
  """
  cfg = config_io.model_config(config)
  _, optim = config_io.phase_configs(config[phase], phase)
  tx = make_optimizer(optim)

  def build():
    params = init_model(cfg, jax.random.key(0))[1]
    if phase == "qat":
      return create_state(params, tx, cfg.num_layers, quant=default_quant(cfg),
                          teacher_params=params)
    return create_state(params, tx, cfg.num_layers)

  return jax.eval_shape(build)


class MissingTeacher(config_io.ConfigError):
  """--teacher does not point at a finished pretraining run or an imported checkpoint."""


def teacher_params(config, teacher_dir: pathlib.Path):
  """The params of a finished `moeqjax pretrain` workdir or an `moeqjax import-hf` folder.

  Nothing is initialised: the restore template comes from jax.eval_shape.
  """
  from moeqjax.convert import workdir as convert_workdir  # local: convert imports runs
  cfg = config_io.model_config(config)
  if convert_workdir.is_imported(teacher_dir):
    return convert_workdir.load_imported_params(teacher_dir, cfg)
  steps = config.pretrain.steps
  if not (teacher_dir / "ckpt").is_dir():
    raise MissingTeacher(f"--teacher {teacher_dir} has no checkpoint; run `moeqjax pretrain "
                         f"--workdir {teacher_dir}` first")
  state = finished_state(teacher_dir, state_template(config, "pretrain"), steps)
  if state is None:
    raise MissingTeacher(
        f"--teacher {teacher_dir} has not finished its {steps} pretraining steps; finish it "
        f"with `moeqjax pretrain --workdir {teacher_dir} --resume`")
  return state.params


def pretrain(config, workdir: str | pathlib.Path, corpus: TokenCorpus, *,
             resume: bool) -> TrainState:
  """Trains the full-precision model (the teacher); reuses a finished run in `workdir`."""
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.pretrain, "pretrain")
  record_config(workdir, {k: config[k].to_dict() for k in ("model", "data", "pretrain")})
  model, params, _ = init_model(cfg, jax.random.key(loop.seed))
  tx = make_optimizer(optim)
  state = create_state(params, tx, cfg.num_layers)
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  step_fn = jit_train_step(model, tx, LossWeights(rec=0, kd=0, value=0, struct=0,
                                                  lb=config.loss.lb, z=config.loss.z))
  return run_training(state, step_fn, corpus.train, loop, workdir, resume=resume,
                      desc="pretrain")


def qat(config, workdir: str | pathlib.Path, corpus: TokenCorpus, teacher_params, *,
        expert_codes_LxE: np.ndarray | None, resume: bool, realloc=None) -> TrainState:
  """Quantization-aware fine-tuning of a student initialised from `teacher_params`.

  Args:
    config: the experiment ConfigDict (model, quant, qat, loss sections are used).
    workdir: this run's folder (checkpoints, metrics.jsonl, config.json).
    corpus: the data; QAT trains on corpus.train.
    teacher_params: the frozen full-precision params (also the student's starting point).
    expert_codes_LxE: per-layer, per-expert bit codes; None uses quant.expert_code everywhere.
    resume: continue a killed run from its latest checkpoint.
    realloc: optional moeqjax.study.progressive.ReallocConfig: re-allocate the expert codes every
      `realloc.every` steps from the statistics gathered so far (progressive QAT, no recompile).

  Returns:
    The final state; its `quant` holds the codes and `params` the fine-tuned student.
  """
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.qat, "qat")
  weights = config_io.loss_weights(config)
  record = {k: config[k].to_dict() for k in ("model", "quant", "data", "qat", "loss")}
  record["expert_codes"] = None if expert_codes_LxE is None else np.asarray(expert_codes_LxE).tolist()
  if realloc is not None:
    record["realloc"] = dataclasses.asdict(realloc)
  record_config(workdir, record)
  model = MoETransformer(cfg)
  quant = default_quant(cfg)
  if expert_codes_LxE is not None:
    quant = set_expert_codes(quant, expert_codes_LxE)
  tx = make_optimizer(optim)
  student = jax.tree.map(jnp.copy, teacher_params)  # separate buffers: the state is donated
  state = create_state(student, tx, cfg.num_layers, quant=quant,
                       teacher_params=jax.tree.map(jnp.copy, teacher_params))
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  step_fn = jit_train_step(model, tx, weights)
  if realloc is not None:
    from moeqjax.study.progressive import progressive_step  # pylint: disable=import-outside-toplevel
    step_fn = progressive_step(step_fn, cfg, realloc)
  return run_training(state, step_fn, corpus.train, loop, workdir, resume=resume,
                      desc=f"qat {workdir.name}")


def default_quant(cfg):
  """The `quant` collection with every code at the rules' defaults (no params allocated)."""
  model = MoETransformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  shapes = nn.meta.unbox(abstract)["quant"]
  return _fill_codes(shapes, cfg.quant)


def _fill_codes(shapes, rules):
  # The collection mirrors the module tree; leaf names tell which rule a code belongs to.

  def fill(path, leaf):
    names = [p.key for p in path]
    if names[-1] == "expert_bits":
      code = rules.expert_code
    elif "attn" in names:
      code = rules.attn_code
    elif "shared_expert" in names:
      code = rules.shared_code
    elif "router" in names:
      code = rules.router_code
    elif "lm_head" in names:
      code = rules.lm_head_code
    else:
      raise ValueError(f"no quantization rule for {'/'.join(names)}")
    return jnp.full(leaf.shape, code, jnp.int32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def expert_codes(quant, num_layers: int) -> np.ndarray:
  """The expert bit codes [L, E] held in a `quant` collection."""
  return np.stack([np.asarray(quant[f"layers_{i}"]["moe"]["expert_bits"])
                   for i in range(num_layers)])


def set_expert_codes(quant, codes_LxE) -> dict:
  """A copy of `quant` with the expert codes replaced (shapes checked)."""
  codes_LxE = validate_codes(np.asarray(codes_LxE))
  num_layers = len([k for k in quant if k.startswith("layers_")])
  current = expert_codes(quant, num_layers)
  if codes_LxE.shape != current.shape:
    raise ValueError(f"allocation has shape {codes_LxE.shape}; this model needs "
                     f"[num_layers, num_experts] = {list(current.shape)}")
  new = jax.tree.map(lambda x: x, quant)
  for i in range(num_layers):
    new[f"layers_{i}"] = dict(new[f"layers_{i}"])
    new[f"layers_{i}"]["moe"] = dict(new[f"layers_{i}"]["moe"])
    new[f"layers_{i}"]["moe"]["expert_bits"] = jnp.asarray(codes_LxE[i], jnp.int32)
  return new
