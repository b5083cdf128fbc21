"""A student's scale ratios (`*_clip` params): created at the start of QAT or by GPTQ, absent from teachers."""

# A teacher (pretrained, imported, or fine-tuned in full precision) has no ratio params; the student's
# forward pass needs one per expert weight when its rules learn or store ratios. init_ratios creates
# them from the weights the student starts from, at their initial value: 1 (the absmax / absmean
# scale) or, with scale_init="mse", the grid-searched MSE-optimal ratio at each expert's code. Ratios
# the start already holds (a GPTQ student's, stored_ratio) are kept: they are what makes its
# weights quantize to GPTQ's integers.

import jax
import jax.numpy as jnp
import numpy as np

from moeqjax import quant as q
from moeqjax.model.codes import EXPERT_BITS, expert_codes
from moeqjax.model.moe_paths import at_path, moe_paths
from moeqjax.model.projection_codes import layer_codes
from moeqjax.quant import clip

_EXPERT_WEIGHTS = ("w_in", "w_gate", "w_out")


def without_ratios(params):
  """A copy of the param tree without learned ratio params (the teacher's view of a student)."""
  if not isinstance(params, dict):
    return params
  return {k: without_ratios(v) for k, v in params.items() if not clip.is_clip_param(k)}


def initial_ratio(w, codes, spec: q.QuantSpec) -> jax.Array:
  """The initial learned ratio of one expert weight [E, in, out] at its codes [E] (scale_shape).

  1 with scale_init="absmax"; the MSE-optimal ratio with "mse" (for clip ratios the intN one,
  capped at 1; ternary experts do not use a clip ratio). Always inside the projected range.
  """
  if spec.scale_init == "absmax":
    return jnp.ones(q.scale_shape(w.shape, spec), w.dtype)
  ratio = q.search_ratio(w, codes, spec)
  return clip.project_clip_ratio(ratio, clip.ratio_max(spec)).astype(w.dtype)


def init_ratios(cfg, params, quant):
  """`params` with every MoE layer's ratio params set to `initial_ratio` at the `quant` codes.

  Args:
    cfg: the ModelConfig or SwitchConfig (its quant rules say whether and how ratios are learned).
    params: the student's starting params (e.g. a teacher's), with or without ratio params.
    quant: the student's `quant` collection (the per-expert codes); its MoE blocks (every layer of
      a decoder-only model, every sparse layer of a Switch model) say where ratios go.

  Returns:
    A new tree; unchanged (a copy without ratios) when the rules carry no ratio. Under
    `stored_ratio` a ratio param that `params` already holds is kept.
  """
  spec = cfg.quant.spec()
  kept = params
  params = without_ratios(params)
  if not spec.has_ratio:
    return params
  codes_LxE = expert_codes(quant)  # [L, E] or [L, 3, E], in moe_paths order
  for layer, path in enumerate(moe_paths(quant, EXPERT_BITS)):
    moe, had = at_path(params, path), at_path(kept, path)
    for name in _EXPERT_WEIGHTS:
      if name not in moe:  # ReLU experts (Switch) have no w_gate
        continue
      codes_E = layer_codes(np.asarray(codes_LxE[layer], np.int32), name)
      key = name + clip.CLIP_SUFFIX
      moe[key] = (had[key] if spec.stored_ratio and key in had
                  else initial_ratio(moe[name], codes_E, spec))
  return params
