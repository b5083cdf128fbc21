"""Progressive QAT: re-allocate expert bits every N steps from the statistics gathered so far, no recompile."""

from __future__ import annotations

import dataclasses

import jax

from moeqjax import config_io


@dataclasses.dataclass(frozen=True)
class ReallocConfig:
  """Re-allocation during QAT (the `realloc` config section)."""

  every: int  # re-allocate before steps every, 2*every, ...; 0 = off
  method: str  # an allocation method (moeqjax.study.allocation.METHODS)
  budget: float  # budget value
  budget_unit: str  # "bits" | "code_bits" | "bytes"
  seed: int = 0  # for method "random"
  levels: tuple = ()  # the paper's (bh, bl) for rule-based methods, e.g. (3, 1); () = bracket

  def __post_init__(self):
    from moeqjax.study.allocation import BUDGET_UNITS, METHODS, check_levels
    if self.every < 0:
      raise config_io.ConfigError(f"realloc.every={self.every} must be >= 0 (0 = off)")
    if self.method not in METHODS:
      raise config_io.ConfigError(f"realloc.method={self.method!r}; use one of {', '.join(METHODS)}")
    if self.budget_unit not in BUDGET_UNITS:
      raise config_io.ConfigError(
          f"realloc.budget_unit={self.budget_unit!r}; use one of {', '.join(BUDGET_UNITS)}")
    check_levels(self.levels, self.method)  # an AllocationError (a ConfigError) says what to fix


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


def progressive_step(step_fn, cfg, realloc: ReallocConfig, log=None):
  """Wraps a jitted QAT step: before steps realloc.every, 2*every, ... the codes are re-allocated.

  The new codes come from the state itself (its router statistics since the start of QAT and its
  current params), so a resumed run re-allocates identically. Codes are traced data: the wrapped
  jitted function is reused without a recompile (see `with_quant`).

  Args:
    step_fn: jitted (state, batch, rng) -> (state, metrics).
    cfg: the ModelConfig.
    realloc: when and how to re-allocate.
    log: optional list; (step, codes [L, E]) is appended at every re-allocation.
  """
  from moeqjax import runs
  from moeqjax.study.allocation import allocate
  from moeqjax.train.state import with_quant

  def fn(state, batch, rng):
    step = int(state.step)
    if step > 0 and step % realloc.every == 0:
      params, stats = jax.device_get((state.params, state.stats))
      result = allocate(realloc.method, cfg, params, stats, realloc.budget, realloc.budget_unit,
                        seed=realloc.seed, levels=realloc.levels)
      state = with_quant(state, runs.set_expert_codes(state.quant, result.codes_LxE))
      if log is not None:
        log.append((step, result.codes_LxE.copy()))
    return step_fn(state, batch, rng)

  fn.jitted = step_fn
  return fn
