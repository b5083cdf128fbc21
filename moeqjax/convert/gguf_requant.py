"""Opt-in re-quantization of a mixed-code expert tensor to one narrower ggml type, and the error it adds."""

# llama.cpp has one ggml type per tensor, so a layer whose experts mix codes is stored exactly at
# the widest expert's container (e.g. ternary + int4 -> Q4_0). `--requantize-mixed TYPE` instead
# stores such a tensor at TYPE: experts that TYPE holds exactly keep their own levels and scales;
# the others are re-quantized from their exact dequantized weights by gguf's reference quantizer.
# That changes the model, so it is off by default and the report gives the relative error.

from __future__ import annotations

import numpy as np

from moeqjax.convert import gguf_blocks, gguf_container
from moeqjax.convert.errors import ConvertError

TYPES = ("TQ2_0", "TQ1_0", "Q4_0")  # narrower than Q4_0/Q8_0, the containers mixed layers widen to


def check_type(qtype: str | None):
  """Refuses an unknown target type (one line, with the choices)."""
  if qtype is not None and qtype not in TYPES:
    raise ConvertError(f"--requantize-mixed {qtype}: choose one of {', '.join(TYPES)}")


def requantize(name: str, levels, scale, qtype: str):
  """Stores expert levels * scale [E, rows, cols] (ggml orientation) at `qtype`.

  Returns:
    (data uint8 [E, rows, bytes], re-quantized expert indices, relative Frobenius error of the
    stored tensor against the exact one).
  """
  import gguf
  block, _ = gguf_blocks.BLOCKS[qtype]
  if levels.shape[-1] % block:
    raise ConvertError(f"--requantize-mixed {qtype}: tensor {name} has rows of {levels.shape[-1]} "
                       f"weights, not a multiple of its block of {block}; choose Q4_0 (block 32) "
                       "or leave the option off")
  exact = levels.astype(np.float32) * scale.astype(np.float32)
  gtype = gguf.GGMLQuantizationType[qtype]
  parts, redone = [], []
  for e in range(levels.shape[0]):
    data, _ = gguf_container.encode_as(qtype, levels[e], scale[e])
    if data is None:
      data = gguf.quants.quantize(exact[e], gtype)
      redone.append(e)
    parts.append(data)
  data = np.stack(parts)
  stored = gguf.quants.dequantize(data, gtype).reshape(exact.shape)
  rel = float(np.linalg.norm(stored - exact) / max(np.linalg.norm(exact), 1e-30))
  return data, redone, rel
