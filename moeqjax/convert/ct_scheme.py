"""Which compressed-tensors scheme holds our codes exactly, and the `quantization_config` that declares it."""

# One scheme per role: transformers 5.x fuses a layer's experts into one tensor and decompresses
# all of them with the experts' config group, and vLLM reads expert 0's scheme for the whole fused
# MoE and accepts 4 or 8 bits there. So every expert of the model shares one width, and so does
# every packed dense matrix (transformers takes one dense group too).

from __future__ import annotations

import re

import numpy as np

from moeqjax.convert.errors import ConvertError
from moeqjax.quant import QuantSpec, code_name

FORMAT = "pack-quantized"
EXPERTS_TARGET = "re:.*experts.*"  # transformers finds the experts' group by "experts" in a re: target
# Group sizes vLLM's Marlin kernels (the MoE path of compressed-tensors WNA16) run; -1 is channel.
VLLM_GROUP_SIZES = (32, 64, 128)
# The width each of our codes is packed at by moeqjax itself (what the allocation paid for).
_OUR_BITS = {"ternary": 2, "int2": 2, "int3": 3, "int4": 4, "int8": 8}


def native_bits(code: int) -> int:
  """The narrowest pack-quantized width of one code: ternary and int2 in 2 bits, intN in N.

  Exact for symmetric levels, and for asymmetric levels q with zero point z moved down by
  2^(bits-1) (keeping q - z) when the zero points are stored. vLLM's MoE kernels take 4 and 8
  bits only; the Switch export (which vLLM does not serve) uses these widths for transformers.
  """
  return _OUR_BITS[code_name(int(code))]


def container_bits(codes, folded: bool = False) -> int:
  """Narrowest exact pack-quantized width (4 or 8) for a set of nonzero codes.

  A level q of ternary, int2, int3 or int4 with scale s is the level q of a signed 4-bit grid
  (levels -8..7) with the same scale; int8 needs 8 bits. An asymmetric level q with zero point z
  moves to q - 2^(bits-1), z - 2^(bits-1), which keeps q - z and fits the same width. With the
  zero point `folded` into a symmetric level q - z (experts, see `fold_zero_points`), intN spans
  [-(2^N - 1), 2^N - 1]: int2 and int3 fit 4 bits, int4 needs 8.
  """
  codes = np.asarray(codes)
  return 8 if np.any(codes == 8) or (folded and np.any(codes == 4)) else 4


def fold_zero_points(spec: QuantSpec, codes, what: str) -> bool:
  """Whether the experts' asymmetric levels are written symmetric as q - z (refusing int8).

  transformers 5.23 decompresses fused experts from weight_packed, weight_scale and weight_shape
  only (its expert converter drops weight_zero_point and fails), so asymmetric experts are stored
  as the exact symmetric levels q - z with the same scale.
  """
  if spec.symmetric:
    return False
  if np.any(np.asarray(codes) == 8):
    raise ConvertError(f"{what}: asymmetric int8 experts need 9-bit levels q - zero_point, and "
                       "transformers cannot load expert zero points; retrain with "
                       "quant.symmetric=True")
  return True


def widening_note(codes_summary: dict, bits: int, ternary_packing: str) -> str:
  """Says where the container is wider than the bits our own packing spends on a code."""
  ours = dict(_OUR_BITS, ternary=2 if ternary_packing == "2bit" else 1.6)
  wider = sorted(k for k in codes_summary if ours[k] < bits)
  notes = []
  if len(codes_summary) > 1:
    notes.append(f"mixed codes {sorted(codes_summary)} share one int{bits} scheme (transformers "
                 "and vLLM apply one scheme to all experts of a model)")
  if wider:
    notes.append(f"int{bits} is wider than our packing of {', '.join(wider)} (vLLM's MoE "
                 "kernels take 4 or 8 bits)")
  return "; ".join(notes)


def check_group_size(spec: QuantSpec):
  """Refuses a group size the format's MoE runtime cannot run (one line, with the fix)."""
  if spec.granularity == "group" and spec.group_size not in VLLM_GROUP_SIZES:
    raise ConvertError(
        f"quant.group_size={spec.group_size}: compressed-tensors group scales run in vLLM with "
        f"group_size {', '.join(map(str, VLLM_GROUP_SIZES))} only; retrain with one of those or "
        "with quant.granularity=channel")


def weights_args(bits: int, spec: QuantSpec, symmetric: bool) -> dict:
  """The `weights` QuantizationArgs of a config group (tensor granularity is written per channel)."""
  group = spec.granularity == "group"
  return {"num_bits": bits, "type": "int", "symmetric": bool(symmetric),
          "strategy": "group" if group else "channel",
          "group_size": spec.group_size if group else None,
          "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def _group(targets, bits, spec, symmetric):
  return {"targets": targets, "weights": weights_args(bits, spec, symmetric), "input_activations": None,
          "output_activations": None, "format": FORMAT}


def quantization_config(spec: QuantSpec, expert_bits: int | None, experts_folded: bool,
                        dense_modules: list[str], dense_bits: int | None,
                        ignore: list[str]) -> dict:
  """The config.json `quantization_config` of a pack-quantized checkpoint.

  Args:
    spec: our quantization spec (granularity, group size, symmetry).
    expert_bits: width of the experts' group, or None when no expert is packed.
    experts_folded: the experts' zero points are folded into symmetric levels.
    dense_modules: HF module names of the packed non-expert Linear layers.
    dense_bits: their shared width, or None.
    ignore: HF module names of Linear layers stored unquantized.
  """
  groups = {}
  if expert_bits:
    groups["group_0"] = _group([EXPERTS_TARGET], expert_bits, spec,
                               spec.symmetric or experts_folded)
  if dense_modules:
    groups[f"group_{len(groups)}"] = _group(
        [f"re:^{re.escape(m)}$" for m in dense_modules], dense_bits, spec, spec.symmetric)
  return {"quant_method": "compressed-tensors", "format": FORMAT,
          "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
          "kv_cache_scheme": None}


def module_group_config(spec: QuantSpec, bits: int | None, modules: list[str],
                        ignore: list[str]) -> dict:
  """A `quantization_config` with one config group of width `bits` targeting HF modules by name.

  For models whose every quantized matrix is its own nn.Linear (Switch: one per expert):
  transformers 5.x decompresses each such Linear with a single config group (its "dense" one,
  whatever the targets of other groups say), so one group holds them all, zero points kept.

  Args:
    spec: our quantization spec.
    bits: the shared width, or None when nothing is packed.
    modules: HF module names of the packed Linear layers.
    ignore: HF module names of Linear layers stored unquantized.
  """
  groups = {}
  if modules:
    groups["group_0"] = _group([f"re:^{re.escape(m)}$" for m in modules], bits, spec,
                               spec.symmetric)
  return {"quant_method": "compressed-tensors", "format": FORMAT,
          "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
          "kv_cache_scheme": None}


def summary(codes) -> dict:
  """{code name: count} over a codes array."""
  names, counts = np.unique([code_name(int(c)) for c in np.ravel(codes)], return_counts=True)
  return {str(n): int(c) for n, c in zip(names, counts)}
