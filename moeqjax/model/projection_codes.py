"""Expert codes per projection: a layer's codes are [E] (one code per expert for its three matrices) or [3, E]."""

# A layer's `expert_bits` in the `quant` collection is either
#   [E]     one code per expert, shared by w_gate, w_in and w_out (the default, and every older run), or
#   [3, E]  one code per (projection, expert), rows in PROJECTIONS order: what a runtime that stores
#           each projection as one tensor with one type (llama.cpp's ffn_{gate,up,down}_exps) can
#           hold, see moeqjax.alloc.gguf_target.
# Whole-model codes are [L, E] or [L, 3, E] likewise. The functions work on numpy and jax arrays.

from __future__ import annotations

import numpy as np

PROJECTIONS = ("w_gate", "w_in", "w_out")  # gate, up, down: the order GGUF lists its expert tensors
NUM_PROJECTIONS = len(PROJECTIONS)


def layer_codes(codes, name: str):
  """The [E] codes of projection `name` from one layer's codes [E] or [3, E]."""
  if name not in PROJECTIONS:
    raise ValueError(f"{name!r} is not an expert projection; use one of {', '.join(PROJECTIONS)}")
  if codes.ndim == 1:
    return codes
  if codes.ndim == 2 and codes.shape[0] == NUM_PROJECTIONS:
    return codes[PROJECTIONS.index(name)]
  raise ValueError(f"a layer's expert codes have shape {tuple(codes.shape)}; they must be [E] or "
                   f"[{NUM_PROJECTIONS}, E] (rows {', '.join(PROJECTIONS)})")


def is_per_projection(codes_model) -> bool:
  """Whether whole-model codes are [L, 3, E] (True) or [L, E] (False); anything else is an error."""
  ndim = np.ndim(codes_model)
  if ndim == 2:
    return False
  if ndim == 3 and np.shape(codes_model)[1] == NUM_PROJECTIONS:
    return True
  raise ValueError(f"expert codes have shape {tuple(np.shape(codes_model))}; they must be [L, E] "
                   f"or [L, {NUM_PROJECTIONS}, E] (rows {', '.join(PROJECTIONS)})")


def by_projection(codes_model) -> dict:
  """{projection: [L, E] codes} of whole-model codes [L, E] (the same array for each) or [L, 3, E]."""
  codes = np.asarray(codes_model)
  if not is_per_projection(codes):
    return {name: codes for name in PROJECTIONS}
  return {name: codes[:, i] for i, name in enumerate(PROJECTIONS)}


def collapse(codes_model) -> np.ndarray:
  """[L, 3, E] codes whose three projections agree as [L, E]; other codes unchanged."""
  codes = np.asarray(codes_model)
  if is_per_projection(codes) and np.all(codes == codes[:, :1]):
    return codes[:, 0]
  return codes
