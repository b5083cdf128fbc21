"""Workdirs shared by the phases: data loading, the recorded config, restoring states and teacher params."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import numpy as np

from moeqjax.alloc import gguf_target
from moeqjax.alloc.allocation import allocation_target, read_allocation
from moeqjax.data import TokenCorpus, check_vocab, encode_corpus, load_corpus, make_tokenizer
from moeqjax.model import default_quant, init_model, set_expert_codes, without_ratios
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline import runs
from moeqjax.pipeline.distributed import is_primary
from moeqjax.pipeline.mesh import sharded_template
from moeqjax.train import Checkpointer, TrainState, create_state, make_optimizer

CONFIG_RECORD = runs.CONFIG_RECORD  # the sections a phase ran with, in its workdir


# A byte model needs 256 ids; a vocab this much larger was made for a subword tokenizer.
BYTE_VOCAB_WARN = 1024


class StaleWorkdir(config_io.ConfigError):
  """A workdir made with a different config than the one now given."""


class MissingTeacher(config_io.ConfigError):
  """--teacher does not point at a finished pretraining run or an imported checkpoint."""


def load_data(config, process_index: int = 0, process_count: int = 1) -> TokenCorpus:
  """Loads `config.data` and tokenizes it for `config.model`.

  Args:
    config: the experiment config; uses data.path, data.valid_fraction, data.text_field,
      data.tokenizer ("" = bytes, else a folder with tokenizer.json) and model.vocab_size.
    process_index, process_count: this host's shard of the train documents (see
      moeqjax.data.load_corpus). The default (0, 1) is the whole train split, which the
      training phases read on every process of a multi-process run: each process then draws
      its rows of one global batch that does not depend on the process count (run_training).

  Returns:
    The train / validation token streams; `.unit` is "byte" or "token" for reports.
  """
  tokenizer = make_tokenizer(config.data.tokenizer)
  # Check the vocab before reading (and tokenizing) a possibly large corpus.
  vocab_size = config_io.any_model_config(config).vocab_size
  check_vocab(tokenizer, vocab_size)
  if tokenizer.name == "bytes" and vocab_size > BYTE_VOCAB_WARN:
    print(f"moeqjax: warning: the model has {vocab_size} token ids but the data are read as UTF-8 "
          "bytes (ids < 256); if the model was made with a subword tokenizer, pass --tokenizer "
          "with its tokenizer.json", file=sys.stderr)
  corpus = load_corpus(config.data.path or None, config.data.valid_fraction,
                       config.data.text_field, process_index=process_index,
                       process_count=process_count)
  return encode_corpus(corpus, tokenizer, vocab_size)


def record_config(workdir: pathlib.Path, section: dict, provenance: dict | None = None):
  """Writes the config a phase ran with, or checks it matches the one recorded before.

  Paths in the data section are recorded absolute, and the tokenizer's files are copied into
  WORKDIR/tokenizer, so that later phases find them from any folder and after a move.
  `provenance` (e.g. {"teacher": path}) is recorded but not compared on resume. In a
  multi-process run process 0 alone reads and writes it (the workdir is shared).
  """
  workdir.mkdir(parents=True, exist_ok=True)
  if not is_primary():
    return
  section = dict(section)
  if "data" in section:
    data = dict(section["data"])
    if data.get("path"):
      data["path"] = str(pathlib.Path(data["path"]).absolute())
    if data.get("tokenizer") in ("", "bytes", None):
      data["tokenizer"] = ""
    else:
      data["tokenizer"] = str(pathlib.Path(data["tokenizer"]).absolute())
    section["data"] = data
  path = workdir / CONFIG_RECORD
  text = json.dumps({**section, **(provenance or {})}, indent=2, sort_keys=True, default=str)
  if path.exists():
    before = runs.comparable(json.loads(path.read_text()))
    now = runs.comparable(json.loads(text))
    if before != now:
      changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
      raise StaleWorkdir(
          f"{workdir} was made with a different config (sections differ: {', '.join(changed)}); "
          "choose another --workdir or delete this one")
  else:
    path.write_text(text + "\n")
  if "data" in section:
    runs.keep_tokenizer(workdir, section["data"]["tokenizer"])


def latest_state(workdir: pathlib.Path, template: TrainState, steps: int | None = None,
                 parts: tuple[str, ...] | None = None):
  """The latest state in workdir/ckpt restored into `template`, or None when there is none
  (or, with `steps`, when the latest checkpoint is not at that step). `parts`: restore only those
  fields (Checkpointer.restore), e.g. ("params", "quant") to read a trained student."""
  ckpt = Checkpointer(pathlib.Path(workdir) / "ckpt", every=0)
  try:
    latest = ckpt.latest_step()
    if latest is None or (steps is not None and latest != steps):
      return None
    return ckpt.restore(template, latest, parts=parts)
  finally:
    ckpt.close()


def finished_state(workdir: pathlib.Path, template: TrainState, steps: int,
                   parts: tuple[str, ...] | None = None):
  """The final state of a phase that already ran to `steps`, or None (`parts`: latest_state)."""
  return latest_state(workdir, template, steps, parts)


def recorded_expert_codes(workdir: pathlib.Path):
  """The expert codes a qat / ptq workdir recorded (nested lists, [L, E] or [L, 3, E]), or None."""
  return (runs.read_record(pathlib.Path(workdir)) or {}).get("expert_codes")


def state_template(config, phase: str, expert_codes=None) -> TrainState:
  """The abstract (shape-only) train state of a "pretrain" or "qat" run, to restore into.

  Nothing is allocated (jax.eval_shape). `expert_codes`: the run's recorded codes
  (recorded_expert_codes); per-projection codes [L, 3, E] give the template their shape.
  A Switch config's template is switch_phases.state_template's.
  """
  if config_io.is_switch(config):
    from moeqjax.pipeline import switch_phases
    return switch_phases.state_template(config, phase, expert_codes)
  quant = default_quant(config_io.model_config(config)) if phase == "qat" else None
  if quant is not None and expert_codes is not None and np.ndim(expert_codes) == 3:
    quant = set_expert_codes(quant, expert_codes)
  cfg = config_io.model_config(config)
  _, optim = config_io.phase_configs(config[phase], phase)
  tx = make_optimizer(optim)

  def build():
    params = init_model(cfg, jax.random.key(0))[1]
    teacher = without_ratios(params)  # teachers never hold learned ratios
    if phase == "qat":
      return create_state(params, tx, cfg.num_layers, quant=quant, teacher_params=teacher)
    return create_state(teacher, tx, cfg.num_layers)

  return jax.eval_shape(build)


def teacher_params(config, teacher_dir: pathlib.Path):
  """The params of a finished `moeqjax pretrain` workdir or an `moeqjax import-hf` folder.

  The teacher's recorded config is the truth: its model must be `config`'s (runtime fields
  aside) and its step count is the one it recorded. Nothing is initialised: the restore template
  comes from jax.eval_shape.
  """
  teacher_dir = pathlib.Path(teacher_dir)
  runs.require_kind(teacher_dir, "--teacher", runs.TEACHER_KINDS, runs.TEACHER_HINT)
  runs.check_family(config, teacher_dir, "--teacher")
  runs.check_same_model(runs.recorded_sections(teacher_dir)["model"], config.model.to_dict(),
                        f"--teacher {teacher_dir} and this run")
  # On a mesh every array is restored straight into its shards (nothing whole on one device).
  template = sharded_template(config, state_template(config, "pretrain"))
  if import_hf.is_imported(teacher_dir):
    return import_hf.load_imported_params(teacher_dir, config_io.any_model_config(config),
                                          template.params)
  steps = int(runs.recorded_sections(teacher_dir)["pretrain"]["steps"])
  if not (teacher_dir / "ckpt").is_dir():
    raise MissingTeacher(f"--teacher {teacher_dir} has no checkpoint; run `moeqjax pretrain "
                         f"--workdir {teacher_dir}` first")
  # The params alone: the pretraining run's optimizer state (2x the params) is never read.
  state = finished_state(teacher_dir, template, steps, parts=("params",))
  if state is None:
    raise MissingTeacher(
        f"--teacher {teacher_dir} has not finished its {steps} pretraining steps; finish it "
        f"with `moeqjax pretrain --workdir {teacher_dir} --resume`")
  return state.params


def teacher_inputs(config, teacher_dir: pathlib.Path, allocation_path: str | None):
  """(teacher params, corpus, codes [L, E], [L, 3, E] or None) for a phase that starts from a
  teacher (`moeqjax qat`, `moeqjax ptq`) with an optional allocation.json; a `--target gguf`
  allocation must be exact in GGUF under this run's quant config (gguf_target.check_exact)."""
  params = teacher_params(config, teacher_dir)
  corpus = load_data(config)
  codes = None
  if allocation_path is not None:
    if config_io.is_switch(config):
      from moeqjax.pipeline import switch_phases
      return params, corpus, switch_phases.read_switch_allocation(config, allocation_path)
    cfg = config_io.model_config(config)
    codes = read_allocation(allocation_path, cfg.num_layers, cfg.num_experts)
    if allocation_target(allocation_path) == "gguf":  # every tensor must stay exact in GGUF
      gguf_target.check_exact(cfg, codes, f"--allocation {allocation_path}")
  return params, corpus, codes
