"""A packed checkpoint read back as the exporters' integer forms: its stored codes and scales, unpacked as they are."""

from __future__ import annotations

import pathlib

import numpy as np

from moeqjax.convert.student_weights import EXPERT_PARAMS, IntForm, StudentWeights, dequantize
from moeqjax.model.projection_codes import layer_codes
from moeqjax.quant import packed_tensor as pt
from moeqjax.serve.checkpoint import moe_blocks, open_packed, param_shapes, read_packed_tensors


class PackedWeights(StudentWeights):
  """The student of a `moeqjax pack` folder, every tensor checked (sha256 with `verify`) on reading.

  Quantized weights come back as the packed integer codes, stored scales (fp16 scales widened to
  float32, exactly) and zero points, so an export from here writes what the checkpoint holds and
  nothing is re-quantized. Unquantized weights are as packed (at the manifest's fp_dtype).
  """

  def __init__(self, folder, *, verify: bool = True):
    self.folder = pathlib.Path(folder)
    self.manifest, self.cfg = open_packed(self.folder)
    self.spec = self.cfg.quant.spec()
    self._shapes = param_shapes(self.cfg)
    self._rows = {block: i for i, block in enumerate(moe_blocks(self.cfg))}  # expert_codes rows
    self._floats, self._buffers = {}, {}  # param -> array; param -> {code: {role: array}}
    for _, rec, arr in read_packed_tensors(self.folder, self.manifest, self.cfg, verify=verify):
      if rec["role"] == "float":
        self._floats[rec["param"]] = arr
      else:
        self._buffers.setdefault(rec["param"], {}).setdefault(rec["code"], {})[rec["role"]] = arr

  @property
  def tokenizer(self) -> str | None:
    """The checkpoint's tokenizer.json, or None for the byte vocabulary."""
    tok = self.manifest["tokenizer"]
    return None if tok == "bytes" else str(self.folder / tok)

  def shape(self, path):
    return self._shapes.get("/".join(path))

  def codes(self, path):
    param = "/".join(path)
    if param not in self._buffers:
      return None
    if path[-1] in EXPERT_PARAMS:
      row = self.manifest["expert_codes"][self._rows["/".join(path[:-1])]]
      return layer_codes(np.asarray(row, np.int32), path[-1])
    (code,) = self._buffers[param]
    return np.asarray(code, np.int32)

  def ints(self, path):
    param, shape = "/".join(path), self.shape(path)
    count = shape[-2] * shape[-1]
    codes = np.broadcast_to(self.codes(path), shape[:-2])
    q = np.zeros(shape, np.int8 if self.spec.symmetric else np.int16)
    scales = zero_points = None
    for code, bufs in self._buffers[param].items():
      members = np.flatnonzero(codes == code) if codes.ndim else Ellipsis
      values = bufs["values"].reshape(-1, bufs["values"].shape[-1])
      q[members] = np.stack([pt.unpack_values(v, code, self.spec, count).reshape(shape[-2:])
                             for v in values]).reshape(q[members].shape)
      if scales is None:
        scales = np.zeros(shape[:-2] + bufs["scales"].shape[-2:], np.float32)
        if not self.spec.symmetric:  # ternary experts store none: their zero point is 0
          zero_points = np.zeros(scales.shape, np.uint8)
      scales[members] = bufs["scales"].astype(np.float32)
      if "zero_points" in bufs:
        zero_points[members] = bufs["zero_points"]
    return IntForm(q, scales, zero_points)

  def dequantized(self, path):
    if self.codes(path) is None:
      return np.asarray(self._floats["/".join(path)], np.float32)
    return dequantize(self.ints(path), self.spec, self.shape(path))
