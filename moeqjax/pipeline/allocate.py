"""`moeqjax allocate`: per-expert (or, for --target gguf, per-tensor) bits from a workdir's router statistics within a budget, to allocation.json."""

from __future__ import annotations

import pathlib

from moeqjax.alloc.allocation import Allocation, AllocationError, allocate, write_allocation
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline.stats import restore_latest


def parse_codes(text: str, error: str) -> tuple[int, ...]:
  """Comma-separated codes, e.g. "1,2,3,4,8"; an AllocationError with the message `error` if not."""
  try:
    return tuple(int(c) for c in text.split(","))
  except ValueError:
    raise AllocationError(error) from None


def allocate_workdir(config, workdir: pathlib.Path, method: str, budget: float, budget_unit: str,
                     *, choices: tuple[int, ...] | None, levels: tuple[int, ...] | None, seed: int,
                     out: pathlib.Path | None = None,
                     target: str = "experts") -> tuple[Allocation, pathlib.Path]:
  """Allocates from the latest state of `workdir` and writes the allocation (default
  WORKDIR/allocation.json); returns the allocation and the file. `choices` None: the target's
  default (1,2,3,4,8 per expert; 1,4,8,0 for gguf)."""
  if config_io.is_switch(config) and target == "gguf":
    raise AllocationError("--target gguf allocates llama.cpp tensor types, and GGUF has no Switch "
                          "Transformer architecture; drop --target gguf (per-expert codes)")
  config, _, state = restore_latest(config, workdir)
  params = state.params
  if config_io.is_switch(config):  # rows = sparse layers, encoder first: codes [L_sparse, E]
    from moeqjax.pipeline import switch_phases
    cfg, params = switch_phases.allocation_view(config, params)
  else:
    cfg = config_io.model_config(config)
  result = allocate(method, cfg, params, state.stats, budget, budget_unit, choices=choices,
                    seed=seed, levels=levels, target=target)
  out = out if out is not None else workdir / "allocation.json"
  write_allocation(out, result)
  return result, out
