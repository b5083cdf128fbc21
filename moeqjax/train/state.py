"""The train state: params, optimizer state, quant codes, frozen teacher and router statistics."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from moeqjax.train.router_stats import init_router_stats


@struct.dataclass
class TrainState:
  """Everything a step reads and writes; all of it is checkpointed.

  `quant` and `teacher_params` are None in full-precision training. In QAT, `quant`
  holds the student's bit codes (traced int32 data, so a new allocation reuses the
  compiled step) and `teacher_params` the frozen full-precision weights.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  quant: Any
  teacher_params: Any
  stats: dict


def create_state(params, tx: optax.GradientTransformation, num_layers: int | None, quant=None,
                 teacher_params=None) -> TrainState:
  """A fresh state at step 0; router statistics start from these params' router norms.

  num_layers: the MoE layers the router statistics cover (checked), or None for every MoE block
  of the params (a Switch model's sparse layers, encoder first; model.moe_paths).
  """
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      quant=quant,
      teacher_params=teacher_params,
      stats=init_router_stats(params, num_layers),
  )


def with_quant(state: TrainState, quant) -> TrainState:
  """The same state with new bit codes (same shapes, dtypes and shardings, so no recompile).

  The new codes are placed as the old ones are (replicated on a mesh, committed or not): jit keys
  its cache on input shardings and on committedness, so either change would compile the step again.
  """
  def like(old, v):
    v = np.asarray(v, old.dtype)
    return jax.device_put(v, old.sharding) if old.committed else jnp.asarray(v)

  new = jax.tree.map(like, state.quant, quant)
  return state.replace(quant=new)
