"""Streaming safetensors reading and writing with numpy alone (bf16 via ml_dtypes), one tensor at a time."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import struct

import ml_dtypes
import numpy as np

from moeqjax.convert.errors import ConvertError

# safetensors dtype names <-> numpy dtypes.
_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """Where one tensor's bytes lie: file, absolute byte offset, dtype and shape."""

  path: pathlib.Path
  offset: int
  nbytes: int
  dtype: np.dtype
  shape: tuple[int, ...]


def read_header(path: pathlib.Path) -> dict[str, TensorInfo]:
  """Parses one .safetensors file's header (no tensor data is read)."""
  try:
    with open(path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise ConvertError(f"{path} is not a safetensors file (shorter than 8 bytes)")
      (n,) = struct.unpack("<Q", raw)
      if n > 100_000_000:
        raise ConvertError(f"{path} is not a safetensors file (header length {n} is implausible)")
      header = json.loads(f.read(n))
  except OSError as e:
    raise ConvertError(f"cannot read {path}: {e.strerror}") from None
  except (json.JSONDecodeError, UnicodeDecodeError):
    raise ConvertError(f"{path} is not a safetensors file (its header is not JSON)") from None
  size = path.stat().st_size
  out = {}
  for name, meta in header.items():
    if name == "__metadata__":
      continue
    if meta["dtype"] not in _DTYPES:
      raise ConvertError(f"tensor {name!r} in {path.name} has dtype {meta['dtype']}, which moeqjax "
                         f"cannot read; supported: {sorted(_DTYPES)}")
    begin, end = meta["data_offsets"]
    dtype = _DTYPES[meta["dtype"]]
    shape = tuple(int(d) for d in meta["shape"])
    if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
      raise ConvertError(f"tensor {name!r} in {path.name} has inconsistent offsets (file truncated?)")
    out[name] = TensorInfo(path, 8 + n + begin, end - begin, dtype, shape)
  return out


def index_checkpoint(hf_dir: str | pathlib.Path) -> dict[str, TensorInfo]:
  """All tensors of a HF checkpoint folder: one model.safetensors or a sharded index.

  Raises:
    ConvertError: no weights, a shard named in the index is missing (the file is named), a tensor
      the index promises is not in its shard, or a tensor appears in two files.
  """
  hf_dir = pathlib.Path(hf_dir)
  index = hf_dir / INDEX_FILE
  if index.is_file():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError):
      raise ConvertError(f"{index} is not a safetensors index (no 'weight_map')") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (hf_dir / f).is_file()]
    if missing:
      raise ConvertError(f"{index.name} names shard file(s) missing from {hf_dir}: "
                         f"{', '.join(missing)}; download or copy them there")
    headers = {f: read_header(hf_dir / f) for f in files}
    out = {}
    for name, fname in weight_map.items():
      if name not in headers[fname]:
        raise ConvertError(f"{index.name} says tensor {name!r} is in {fname}, but it is not there")
      out[name] = headers[fname][name]
    for fname, header in headers.items():
      for name in header:
        if name not in weight_map:
          raise ConvertError(f"tensor {name!r} is in {fname} but not in {index.name}'s weight_map")
    return out
  paths = sorted(hf_dir.glob("*.safetensors"))
  if not paths:
    raise ConvertError(f"no {SINGLE_FILE} or {INDEX_FILE} in {hf_dir}; moeqjax imports "
                       "safetensors checkpoints (convert .bin files with transformers first)")
  out = {}
  for p in paths:
    for name, info in read_header(p).items():
      if name in out:
        raise ConvertError(f"tensor {name!r} is in both {out[name].path.name} and {p.name}")
      out[name] = info
  return out


def read_tensor(info: TensorInfo) -> np.ndarray:
  """Reads one tensor into a fresh numpy array (its own dtype and shape)."""
  buf = np.empty(info.shape, info.dtype)
  with open(info.path, "rb") as f:
    f.seek(info.offset)
    got = f.readinto(memoryview(buf.reshape(-1).view(np.uint8)))
  if got != info.nbytes:
    raise ConvertError(f"{info.path} ended early while reading a tensor (file truncated?)")
  return buf


def dtype_name(dtype) -> str:
  return _NAMES[np.dtype(dtype)]


class StreamingWriter:
  """Writes a .safetensors file tensor by tensor; the header is fixed up front from shapes."""

  def __init__(self, path: str | pathlib.Path, specs: list[tuple[str, tuple[int, ...], np.dtype]],
               metadata: dict[str, str] | None = None):
    self.path = pathlib.Path(path)
    header, offset = {}, 0
    self._order = []
    for name, shape, dtype in specs:
      n = math.prod(shape) * np.dtype(dtype).itemsize
      header[name] = {"dtype": dtype_name(dtype), "shape": list(shape),
                      "data_offsets": [offset, offset + n]}
      self._order.append((name, tuple(shape), np.dtype(dtype)))
      offset += n
    header["__metadata__"] = metadata or {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # aligned data start, as the reference writer does
    self._f = open(self.path, "wb")
    self._f.write(struct.pack("<Q", len(blob)) + blob)
    self._next = 0

  def write(self, name: str, array: np.ndarray):
    """Writes the next tensor; tensors must come in the order given at construction."""
    want_name, shape, dtype = self._order[self._next]
    if name != want_name or tuple(array.shape) != shape or array.dtype != dtype:
      raise ValueError(f"expected tensor {want_name} {shape} {dtype}, got {name} "
                       f"{tuple(array.shape)} {array.dtype}")
    self._f.write(np.ascontiguousarray(array).tobytes())
    self._next += 1

  def close(self):
    if self._next != len(self._order):
      self._f.close()
      raise ValueError(f"only {self._next} of {len(self._order)} tensors written to {self.path}")
    self._f.close()
