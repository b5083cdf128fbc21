"""Grouping of a [..., in, out] weight into quantization groups (per tensor, per channel, per block)."""

# Every granularity maps to one grouped form [..., n_in_groups, group_len, n_cols], so a group's
# statistic is always a reduction over axis -2 and the quantizers need no per-granularity branches:
#   "tensor":  [..., 1, in * out, 1]   one group per leading index
#   "channel": [..., 1, in, out]       one group per output channel
#   "group":   [..., in // G, G, out]  one group per G consecutive input weights of an output channel
# Stored scales have scale_shape = [..., n_in_groups, n_cols]; for "tensor" and "channel" that shape
# broadcasts directly against the [..., in, out] weight. The helpers only reshape and reduce, so they
# work on numpy (host-side packing) and jax arrays alike.

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from moeqjax.quant.formats import QuantSpec


def _check_weight_shape(shape, spec: QuantSpec) -> tuple[int, ...]:
  shape = tuple(int(d) for d in shape)
  if len(shape) < 2:
    raise ValueError(
        f"weight shape {shape} has fewer than 2 dims; weights are laid out [..., in, out]"
        " (reshape a vector to [in, 1])")
  if spec.granularity == "group" and shape[-2] % spec.group_size != 0:
    raise ValueError(
        f"group_size={spec.group_size} does not divide the input dim {shape[-2]} of weight shape"
        f" {shape}; choose a group_size that divides {shape[-2]} or use granularity='channel'")
  return shape


def grouped_shape(shape, spec: QuantSpec) -> tuple[int, ...]:
  """Shape of the grouped form of a weight.

  Args:
    shape: weight shape [..., in, out].
    spec: the quantization spec (granularity and group_size are used).

  Returns:
    [..., n_in_groups, group_len, n_cols] as described in the module docstring.
  """
  shape = _check_weight_shape(shape, spec)
  *lead, d_in, d_out = shape
  if spec.granularity == "tensor":
    return (*lead, 1, d_in * d_out, 1)
  if spec.granularity == "channel":
    return (*lead, 1, d_in, d_out)
  return (*lead, d_in // spec.group_size, spec.group_size, d_out)


def scale_shape(shape, spec: QuantSpec) -> tuple[int, ...]:
  """Shape of the per-group scales (and zero points, and clipping ratios) of a weight.

  Args:
    shape: weight shape [..., in, out].
    spec: the quantization spec.

  Returns:
    [..., n_in_groups, n_cols]: [..., 1, 1] per tensor, [..., 1, out] per channel,
    [..., in // G, out] per group.
  """
  g = grouped_shape(shape, spec)
  return (*g[:-3], g[-3], g[-1])


def num_groups(shape, spec: QuantSpec) -> int:
  """Number of scales stored for one weight of `shape` (all leading indices included)."""
  return math.prod(scale_shape(shape, spec))


def to_groups(w, spec: QuantSpec):
  """Reshapes a weight [..., in, out] to its grouped form [..., n_in_groups, group_len, n_cols]."""
  return w.reshape(grouped_shape(w.shape, spec))


def from_groups(w_grouped, shape):
  """Inverse of `to_groups`: reshapes a grouped weight back to `shape` [..., in, out]."""
  return w_grouped.reshape(tuple(shape))


def stats_to_scales(stat_grouped):
  """Drops the group_len axis of a per-group statistic: [..., ng, 1, nc] -> [..., ng, nc]."""
  return stat_grouped.reshape(stat_grouped.shape[:-2] + stat_grouped.shape[-1:])


def scales_to_stats(scales, shape, spec: QuantSpec):
  """Broadcasts per-group values (scale shape or any shape broadcastable to it) to [..., ng, 1, nc].

  Args:
    scales: array broadcastable to `scale_shape(shape, spec)`, e.g. a scalar or [E, 1, 1].
    shape: weight shape [..., in, out].
    spec: the quantization spec.

  Returns:
    The values in grouped-statistic form [..., n_in_groups, 1, n_cols].
  """
  target = scale_shape(shape, spec)
  try:
    full = _broadcast_to(scales, target)
  except ValueError as err:
    raise ValueError(
        f"per-group values of shape {tuple(scales.shape)} do not broadcast to the scale shape {target}"
        f" of a weight {tuple(shape)} at granularity {spec.granularity!r}; use an array of shape"
        f" {target} (see moeqjax.quant.scale_shape)") from err
  return full.reshape(target[:-1] + (1, target[-1]))


def _broadcast_to(x, shape):
  # Keep the caller's array library: numpy in (host-side packing), numpy out; jax otherwise.
  if isinstance(x, (np.ndarray, np.generic, int, float)):
    return np.broadcast_to(x, shape)
  return jnp.broadcast_to(x, shape)


def reduce_groups(x_grouped, op: Callable, **kwargs):
  """Per-group reduction of a grouped array over its group_len axis, keeping the axis.

  Args:
    x_grouped: array in grouped form [..., n_in_groups, group_len, n_cols].
    op: a reduction such as jnp.max, jnp.mean, np.sum (called with axis=-2, keepdims=True).
    **kwargs: passed through to `op` (e.g. where=mask).

  Returns:
    The statistic [..., n_in_groups, 1, n_cols].
  """
  return op(x_grouped, axis=-2, keepdims=True, **kwargs)
