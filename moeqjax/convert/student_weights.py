"""A quantized student's weights as the exporters read them: codes, integer forms and floats, by param path."""

# The exporters (GGUF, compressed-tensors, HF) never re-derive integer codes from dequantized
# floats: they ask a `StudentWeights` for each quantized param's integer form (q, scales, zero
# points, as `quantize_to_ints` returns it, learned clip ratios folded into the scales). One
# implementation computes it from params and the `quant` codes (`ParamWeights`); another reads it
# from a packed checkpoint (moeqjax.serve.packed_weights_source), so both export the same bytes.

from __future__ import annotations

import abc
import dataclasses

import jax
import numpy as np

from moeqjax.convert.tree_paths import get_path
from moeqjax.model import ModelConfig
from moeqjax.model.projection_codes import layer_codes
from moeqjax.quant import (dequantize_ints, formats, quantize_dequantize,
                           quantize_to_ints)
from moeqjax.quant.clip import learned_ratio

EXPERT_PARAMS = ("w_in", "w_gate", "w_out")


def codes_path(path: tuple) -> tuple | None:
  """Where the `quant` collection keeps the codes of the param at `path` (None: never quantized)."""
  if path[-1] in EXPERT_PARAMS:
    return path[:-1] + ("expert_bits",)
  if path[-1] == "kernel":
    return path[:-1] + ("bits",)
  return None


@dataclasses.dataclass(frozen=True)
class IntForm:
  """A quantized weight as integers: (q - zero_point) * scale per group (`quantize_to_ints`).

  q: [..., in, out] int8 (symmetric specs) or int16 (asymmetric).
  scales: float32 [..., n_in_groups, n_cols], exactly the scales the student dequantizes with.
  zero_points: uint8 like `scales` for asymmetric specs (0 for ternary), else None.
  """

  q: np.ndarray
  scales: np.ndarray
  zero_points: np.ndarray | None


class StudentWeights(abc.ABC):
  """Read access to one quantized student, param by param (paths of our param tree)."""

  cfg: ModelConfig

  @abc.abstractmethod
  def shape(self, path: tuple) -> tuple | None:
    """The param's shape, or None when the model has no such param."""

  @abc.abstractmethod
  def codes(self, path: tuple) -> np.ndarray | None:
    """Its validated codes ([E] for experts, a scalar for a kernel); None when unquantized."""

  @abc.abstractmethod
  def ints(self, path: tuple) -> IntForm:
    """The integer form of a param whose codes are all quantized."""

  @abc.abstractmethod
  def dequantized(self, path: tuple) -> np.ndarray:
    """float32: the weight as the student's forward pass uses it (the param itself if unquantized)."""


class ParamWeights(StudentWeights):
  """A student as params + its `quant` collection (None: every weight full precision)."""

  def __init__(self, cfg: ModelConfig, params, quant):
    self.cfg, self.params, self.quant = cfg, params, quant
    self.spec = cfg.quant.spec()

  def shape(self, path):
    w = get_path(self.params, path)
    return None if w is None else tuple(np.shape(w))

  def codes(self, path):
    where = codes_path(path)
    codes = None if (self.quant is None or where is None) else get_path(self.quant, where)
    if codes is None:
      return None
    codes = formats.validate_codes(jax.device_get(codes))
    if path[-1] in EXPERT_PARAMS:  # [E], or [3, E] with a row per projection
      codes = layer_codes(codes, path[-1])
    return None if np.all(codes == formats.FP) else codes  # code 0 passes the weight through

  def _array(self, path):
    return np.asarray(jax.device_get(get_path(self.params, path)), np.float32)

  def _clip(self, path):
    """The effective learned ratio (clip or scale) of an expert weight, or None."""
    return learned_ratio(self.params, path, self.spec) if path[-1] in EXPERT_PARAMS else None

  def ints(self, path):
    return IntForm(*quantize_to_ints(self._array(path), self.codes(path), self.spec,
                                     self._clip(path)))

  def dequantized(self, path):
    w, codes = self._array(path), self.codes(path)
    if codes is None:
      return w
    w = np.asarray(jax.device_get(quantize_dequantize(w, codes, self.spec, self._clip(path))),
                   np.float32)
    # Fake quant rounds a small negative weight to -0.0 where the integer form (and so a packed
    # checkpoint's `dequantize`) gives +0.0; adding +0.0 makes them the same bytes in every export.
    return w + np.float32(0.0)


def dequantize(form: IntForm, spec, shape) -> np.ndarray:
  """float32 weight of an integer form (equal to `quantize_dequantize` of what was quantized)."""
  return dequantize_ints(form.q, form.scales, form.zero_points, spec, shape)
