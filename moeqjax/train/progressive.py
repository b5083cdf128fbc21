"""Progressive QAT: a step wrapper that re-allocates expert codes every N steps through a callback, no recompile."""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from moeqjax.model.codes import set_expert_codes
from moeqjax.train.state import with_quant

# (params, router statistics) on the host -> new expert codes [L, E].
AllocateFn = Callable[[dict, dict], np.ndarray]


def progressive_step(step_fn, every: int, allocate_codes: AllocateFn, log=None):
  """Wraps a jitted QAT step: before steps every, 2*every, ... the expert codes are re-allocated.

  The new codes come from the state itself (its router statistics since the start of QAT and its
  current params), so a resumed run re-allocates identically. Codes are traced data: the wrapped
  jitted function is reused without a recompile (see `with_quant`).

  Args:
    step_fn: jitted (state, batch, rng) -> (state, metrics).
    every: re-allocate before steps that are a positive multiple of it (> 0).
    allocate_codes: (params, stats) -> codes [L, E]; e.g. a method of moeqjax.alloc.allocation.
    log: optional list; (step, codes [L, E]) is appended at every re-allocation.
  """
  if every <= 0:
    raise ValueError(f"every={every} must be > 0 to re-allocate")

  def fn(state, batch, rng):
    step = int(state.step)
    if step > 0 and step % every == 0:
      params, stats = jax.device_get((state.params, state.stats))
      codes_LxE = np.asarray(allocate_codes(params, stats))
      state = with_quant(state, set_expert_codes(state.quant, codes_LxE))
      if log is not None:
        log.append((step, codes_LxE.copy()))
    return step_fn(state, batch, rng)

  fn.jitted = step_fn
  return fn
