"""What an export or pack may write over: nothing, an empty folder, or (--overwrite) an output moeqjax wrote."""

# One rule for every output (pack folders, hf and compressed-tensors folders, GGUF files):
#   - a path that does not exist, or an empty folder (folder outputs), is written;
#   - anything else needs --overwrite, and even then is replaced only when moeqjax recognisably
#     wrote it and it holds nothing else: a pack folder by its manifest.json (format
#     moeqjax-packed), an hf / compressed-tensors folder by MARKER (which lists the files written),
#     a GGUF file by its GGUF_KEY metadata, a GGUF's report by its "writer" field;
#   - the new output is built under a fresh hidden name in the same parent and swapped in with
#     os.replace only when complete; the old one is removed after that.
# Refusals are one-line ConvertErrors; a refused path is left untouched.

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import shutil

from moeqjax.convert.errors import ConvertError

WRITER = "moeqjax"
MARKER = "moeqjax_export.json"  # {"writer": "moeqjax", "format": kind, "files": [names]}
GGUF_KEY = "moeqjax.writer"  # GGUF metadata string WRITER
REPORT_SUFFIX = ".export_report.json"  # FILE.gguf -> FILE.export_report.json
PACKED_MANIFEST, PACKED_FORMAT = "manifest.json", "moeqjax-packed"  # as serve/checkpoint.py writes
FOLDER_KINDS = {"packed": "`moeqjax pack`", "hf": "--format hf",
                "compressed-tensors": "--format compressed-tensors"}
FILE_KINDS = {"gguf": "--format gguf", "gguf report": "--format gguf"}
_MAX_JSON_BYTES = 1 << 26


def report_path(gguf_file) -> pathlib.Path:
  """The report of a GGUF export: beside the file, named after it (two exports keep two reports)."""
  gguf_file = pathlib.Path(gguf_file)
  return gguf_file.with_name(gguf_file.stem + REPORT_SUFFIX)


def _json(path: pathlib.Path):
  """The JSON in a small file, else None (a large file is no marker of ours, and is not read)."""
  try:
    if path.stat().st_size > _MAX_JSON_BYTES:
      return None
    return json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, ValueError):
    return None


def _folder_kind(folder: pathlib.Path) -> tuple[str | None, set[str], str]:
  """(kind moeqjax wrote or None, the file names it wrote, what proof was looked for)."""
  manifest = _json(folder / PACKED_MANIFEST)
  if isinstance(manifest, dict) and manifest.get("format") == PACKED_FORMAT:
    files = {PACKED_MANIFEST} | {rec.get("file") for rec in manifest.get("tensors", {}).values()}
    if manifest.get("tokenizer") not in (None, "bytes"):
      files.add(manifest["tokenizer"])
      files.update(manifest.get("tokenizer_files") or ())
    return "packed", files, ""
  marker = _json(folder / MARKER)
  if (isinstance(marker, dict) and marker.get("writer") == WRITER
      and marker.get("format") in FOLDER_KINDS):
    return marker["format"], {MARKER, *marker.get("files", [])}, ""
  return None, set(), f"no {MARKER} or {PACKED_MANIFEST} of format {PACKED_FORMAT}"


def _file_is_ours(path: pathlib.Path, kind: str) -> tuple[bool, str]:
  """(whether moeqjax wrote the file as `kind`, what proof was looked for)."""
  if kind == "gguf report":
    report = _json(path)
    ours = isinstance(report, dict) and report.get("writer") == WRITER and (
        report.get("format") == "gguf")
    return ours, f'no "writer": "{WRITER}" in it'
  why = f"no {GGUF_KEY} key in its GGUF metadata"
  try:
    with path.open("rb") as f:
      if f.read(4) != b"GGUF":
        return False, "not a GGUF file"
    import gguf
    field = gguf.GGUFReader(str(path)).fields.get(GGUF_KEY)
    return field is not None and bytes(field.parts[-1]).decode() == WRITER, why
  except Exception:  # an unreadable or damaged GGUF: not provably ours
    return False, why


def _refuse_foreign(path: pathlib.Path, why: str):
  raise ConvertError(f"{path} was not written by moeqjax ({why}); choose another --out or remove "
                     "it yourself")


def _check_one(path: pathlib.Path, kind: str, overwrite: bool):
  folder = kind in FOLDER_KINDS
  if not path.exists() and not path.is_symlink():
    return
  if folder and path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
    return  # an empty folder holds nothing to lose
  if not overwrite:
    raise ConvertError(f"{path} exists; pass --overwrite to replace it")
  label = FOLDER_KINDS.get(kind) or FILE_KINDS[kind]
  if path.is_symlink():
    raise ConvertError(f"{path} is a symbolic link; {label} replaces only what it wrote itself, "
                       "so choose another --out or remove it yourself")
  if folder and not path.is_dir():
    raise ConvertError(f"{path} is a file; {label} writes a folder")
  if not folder and path.is_dir():
    raise ConvertError(f"{path} is a folder; --format gguf writes one file, e.g. model.gguf")
  if not folder:
    ours, why = _file_is_ours(path, kind)
    if not ours:
      _refuse_foreign(path, why)
    return
  found, files, why = _folder_kind(path)
  if found is None:
    _refuse_foreign(path, why)
  if found != kind:
    raise ConvertError(f"{path} was written by {FOLDER_KINDS[found]}, not {label}; choose another "
                       "--out or remove it yourself")
  extra = sorted(p.name for p in path.iterdir() if p.name not in files)
  if extra:
    raise ConvertError(f"{path} holds files moeqjax did not write ({', '.join(extra[:3])}"
                       f"{', ...' if len(extra) > 3 else ''}); choose another --out or remove "
                       "them yourself")


def check_output(out, kind: str, overwrite: bool) -> pathlib.Path:
  """The output path, or a one-line ConvertError when writing it could lose something.

  Args:
    out: the folder (kinds "packed", "hf", "compressed-tensors") or file ("gguf": its report
      beside it is checked too) to write.
    kind: what will be written there.
    overwrite: the user's --overwrite: replace an output of the same kind that moeqjax wrote.

  Returns:
    out as a Path.
  """
  out = pathlib.Path(out)
  _check_one(out, kind, overwrite)
  if kind == "gguf":
    _check_one(report_path(out), "gguf report", overwrite)
  return out


def _fresh(out: pathlib.Path, suffix: str, make) -> pathlib.Path:
  """A new hidden path beside `out`, created by `make` (which fails on an existing path)."""
  out = pathlib.Path(os.path.abspath(out))  # "." and "x/.." name no folder to put it beside
  out.parent.mkdir(parents=True, exist_ok=True)
  while True:
    path = out.parent / f".{out.name}.{secrets.token_hex(4)}{suffix}"
    try:
      make(path)
      return path
    except FileExistsError:
      continue


def temp_folder(out: pathlib.Path) -> pathlib.Path:
  """A fresh hidden folder beside `out` to build it in (never an existing path)."""
  return _fresh(out, ".partial", pathlib.Path.mkdir)


def temp_file(out: pathlib.Path) -> pathlib.Path:
  """A fresh hidden (empty) file beside `out` to write it to."""
  return _fresh(out, ".partial", lambda p: p.open("x").close())


def discard(tmp: pathlib.Path):
  """Removes a temporary output of ours (a failed or refused write)."""
  if tmp.is_dir():
    shutil.rmtree(tmp, ignore_errors=True)
  else:
    tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def building_folder(out: pathlib.Path, kind: str, overwrite: bool, extra_files: dict | None = None):
  """Yields a fresh hidden folder to build `out` in; when the block ends, writes `extra_files` and
  MARKER into it and swaps it in (`replace`). If the block raises, the folder is removed."""
  tmp = temp_folder(out)
  try:
    yield tmp
    write_files(tmp, extra_files)
    mark_folder(tmp, kind)
  except BaseException:
    discard(tmp)
    raise
  replace(tmp, out, kind, overwrite)


def write_files(tmp: pathlib.Path, files: dict | None):
  """Writes {name: bytes} (e.g. the tokenizer's files) into a folder being built, before its MARKER."""
  for name, data in (files or {}).items():
    if pathlib.Path(name).name != name:
      raise ConvertError(f"{name!r} is not a plain file name")
    (tmp / name).write_bytes(data)


def mark_folder(tmp: pathlib.Path, kind: str):
  """Writes MARKER into a finished hf / compressed-tensors folder, listing what it holds."""
  files = sorted(p.name for p in tmp.iterdir())
  (tmp / MARKER).write_text(json.dumps({"writer": WRITER, "format": kind, "files": files},
                                       indent=1) + "\n")


def replace(tmp: pathlib.Path, out: pathlib.Path, kind: str, overwrite: bool):
  """Swaps the complete `tmp` in as `out`, checked once more (the write may have taken minutes).

  A replaced folder is first renamed aside and removed only after the swap, so a crash leaves the
  old or the new output in full. On a refusal `tmp` is removed and `out` left as it is.
  """
  try:
    _check_one(out, kind, overwrite)
  except ConvertError:
    discard(tmp)
    raise
  out = pathlib.Path(os.path.abspath(out))
  if out.is_dir() and any(out.iterdir()):
    old = _fresh(out, ".old", pathlib.Path.mkdir)
    os.replace(out, old)  # onto our own empty folder: allowed for directories
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.replace(tmp, out)


def write_text(path: pathlib.Path, text: str, kind: str, overwrite: bool):
  """Writes a small file (a GGUF's report) atomically under the same rule."""
  tmp = temp_file(path)
  try:
    tmp.write_text(text)
  except BaseException:
    discard(tmp)
    raise
  replace(tmp, path, kind, overwrite)
