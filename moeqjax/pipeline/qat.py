"""`moeqjax qat`: quantization-aware fine-tuning from a teacher, with optional progressive re-allocation."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax.alloc.allocation import BUDGET_UNITS, METHODS, allocate, check_levels
from moeqjax.data import TokenCorpus
from moeqjax.model import (MoETransformer, default_quant, init_ratios, set_expert_codes,
                           without_ratios)
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline.mesh import run_placement
from moeqjax.pipeline.ptq import init_from_student
from moeqjax.pipeline.workdirs import finished_state, record_config, teacher_inputs
from moeqjax.train import (TrainState, create_state, jit_train_step, make_optimizer,
                           run_training)
from moeqjax.train import progressive
from moeqjax.train.sharding import init_sharded


@dataclasses.dataclass(frozen=True)
class ReallocConfig:
  """Re-allocation during QAT (the `realloc` config section)."""

  every: int  # re-allocate before steps every, 2*every, ...; 0 = off
  method: str  # an allocation method (moeqjax.alloc.allocation.METHODS)
  budget: float  # budget value
  budget_unit: str  # "bits" | "code_bits" | "bytes"
  seed: int = 0  # for method "random"
  levels: tuple = ()  # the paper's (bh, bl) for rule-based methods, e.g. (3, 1); () = bracket

  def __post_init__(self):
    if self.every < 0:
      raise config_io.ConfigError(f"realloc.every={self.every} must be >= 0 (0 = off)")
    if self.method not in METHODS:
      raise config_io.ConfigError(f"realloc.method={self.method!r}; use one of {', '.join(METHODS)}")
    if self.budget_unit not in BUDGET_UNITS:
      raise config_io.ConfigError(
          f"realloc.budget_unit={self.budget_unit!r}; use one of {', '.join(BUDGET_UNITS)}")
    check_levels(self.levels, self.method)  # an AllocationError says what to fix


@functools.lru_cache(maxsize=4)
def compiled_qat_step(cfg, optim, weights):
  """The jitted QAT step for a (model config, optimizer config, loss weights).

  Expert codes are traced data, so runs that differ only in their codes (the demo's variants,
  full precision included) share one compile instead of paying one each.
  """
  return jit_train_step(MoETransformer(cfg), make_optimizer(optim), weights)


def realloc_from_config(config) -> ReallocConfig | None:
  """The config's `realloc` section as a ReallocConfig, or None when it is absent or every == 0."""
  if "realloc" not in config:
    return None
  section = config.realloc.to_dict()
  try:
    rc = ReallocConfig(**section)
  except TypeError as e:
    raise config_io.ConfigError(f"config section 'realloc': {e}") from None
  return rc if rc.every > 0 else None


def progressive_step(step_fn, cfg, realloc: ReallocConfig, log=None, params_view=None):
  """`step_fn` re-allocating with `realloc`'s method and budget every `realloc.every` steps.

  See moeqjax.train.progressive.progressive_step; `log` gets (step, codes [L, E]) per re-allocation.
  `cfg` is the ModelConfig the allocator reads; `params_view` maps the state's params to the params
  it reads (a Switch model's sparse layers as layers_i: switch_phases.allocation_view), None: as
  they are.
  """

  def allocate_codes(params, stats):
    if params_view is not None:
      params = params_view(params)
    return allocate(realloc.method, cfg, params, stats, realloc.budget, realloc.budget_unit,
                    seed=realloc.seed, levels=realloc.levels).codes_LxE

  return progressive.progressive_step(step_fn, realloc.every, allocate_codes, log=log)


def qat(config, workdir: str | pathlib.Path, corpus: TokenCorpus, teacher_params, *,
        expert_codes_LxE: np.ndarray | None, resume: bool, realloc=None,
        init_from: tuple[str, object] | None = None,
        provenance: dict | None = None) -> TrainState:
  """Quantization-aware fine-tuning of a student initialised from `teacher_params`.

  Args:
    config: the experiment ConfigDict (model, quant, qat, loss sections are used).
    workdir: this run's folder (checkpoints, metrics.jsonl, config.json).
    corpus: the data; QAT trains on corpus.train.
    teacher_params: the frozen full-precision params (also the student's starting point).
    expert_codes_LxE: per-layer, per-expert bit codes [L, E], or per projection [L, 3, E]
      (`allocate --target gguf`); None uses quant.expert_code everywhere.
    resume: continue a killed run from its latest checkpoint.
    realloc: optional ReallocConfig: re-allocate the expert codes every `realloc.every` steps
      from the statistics gathered so far (progressive QAT, no recompile).
    init_from: optional (name, params): the student starts from these params (e.g. a `moeqjax ptq`
      workdir's GPTQ student) instead of the teacher's; the name is recorded in config.json.
    provenance: recorded in config.json but not compared on resume (e.g. {"teacher": path}).

  Returns:
    The final state; its `quant` holds the codes and `params` the fine-tuned student.
  """
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.qat, "qat")
  weights = config_io.loss_weights(config)
  record = {k: config[k].to_dict() for k in ("model", "quant", "data", "qat", "loss")}
  record["expert_codes"] = None if expert_codes_LxE is None else np.asarray(expert_codes_LxE).tolist()
  if init_from is not None:
    record["init_from"] = init_from[0]
  if realloc is not None:
    record["realloc"] = dataclasses.asdict(realloc)
  record_config(workdir, record, provenance)
  quant = default_quant(cfg)
  if expert_codes_LxE is not None:
    quant = set_expert_codes(quant, expert_codes_LxE)
  tx = make_optimizer(optim)
  teacher_params = without_ratios(teacher_params)
  start = teacher_params if init_from is None else init_from[1]
  # Learned ratios start at their initial value (computed from the concrete codes, outside jit).
  start = init_ratios(cfg, start, quant)

  def build(teacher, student, codes):
    # Separate buffers: the state is donated.
    return create_state(jax.tree.map(jnp.copy, student), tx, cfg.num_layers, quant=codes,
                        teacher_params=jax.tree.map(jnp.copy, teacher))

  place = run_placement(config, jax.eval_shape(build, teacher_params, start, quant),
                        loop.batch_size)
  state = build(teacher_params, start, quant) if place is None else init_sharded(
      build, place.state, teacher_params, start, quant)
  done = finished_state(workdir, state, loop.steps)
  if done is not None:
    return done
  if place is None:
    step_fn = compiled_qat_step(cfg, optim, weights)
  else:
    step_fn = jit_train_step(MoETransformer(cfg), tx, weights, placement=place)
  if realloc is not None:
    step_fn = progressive_step(step_fn, cfg, realloc)
  return run_training(state, step_fn, corpus.train, loop, workdir, resume=resume,
                      desc=_progress_label(workdir), placement=place)


def _progress_label(workdir: pathlib.Path) -> str:
  """"qat" and the run's folder name, once (a folder named qat_ternary is not "qat qat_ternary")."""
  return workdir.name if "qat" in workdir.name else f"qat {workdir.name}"


def qat_from_teacher(config, workdir: pathlib.Path, teacher_dir: pathlib.Path,
                     allocation_path: str | None, *, resume: bool,
                     init_from: pathlib.Path | None = None) -> TrainState:
  """`moeqjax qat`: the teacher's params, the data, optional allocation.json and `realloc` section.

  With `init_from` (a `moeqjax ptq` workdir) the student starts from that PTQ student, at its codes
  unless an allocation is given. An imported teacher's original config.json is kept in the
  workdir, for `moeqjax export`. A Switch config (config_io.is_switch) runs
  switch_phases.qat_from_teacher.
  """
  if config_io.is_switch(config):
    from moeqjax.pipeline import switch_phases
    return switch_phases.qat_from_teacher(config, workdir, teacher_dir, allocation_path,
                                          resume=resume, init_from=init_from,
                                          realloc=realloc_from_config(config))
  params, corpus, codes = teacher_inputs(config, teacher_dir, allocation_path)
  realloc = realloc_from_config(config)
  if realloc is not None and codes is not None and np.ndim(codes) == 3:
    raise config_io.ConfigError(
        f"--allocation {allocation_path} holds per-projection codes (allocate --target gguf), "
        "which re-allocation (realloc.every > 0) would replace by per-expert ones; set "
        "--config.realloc.every=0")
  start, codes = init_from_student(config, init_from, codes)
  state = qat(config, workdir, corpus, params, expert_codes_LxE=codes, resume=resume,
              realloc=realloc, init_from=start,
              provenance={"teacher": str(pathlib.Path(teacher_dir).absolute())})
  import_hf.keep_hf_config(teacher_dir, workdir)
  return state
