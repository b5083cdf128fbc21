"""Readers that turn local files (folders, text files, jsonl) into documents of UTF-8 bytes."""

import json
import os
import pathlib

from moeqjax.data.errors import DataError

# A document is (key, content): the key (relative posix path or record index) decides its split.
Document = tuple[str, bytes]


def list_files(root: pathlib.Path, exclude_dirs: frozenset[str], suffix: str | None = None,
               skip_hidden: bool = False) -> list[str]:
    """Lists files under root, pruning excluded directories before descending into them.

    Args:
      root: folder to walk (symlinked folders are not followed, so a link cannot loop).
      exclude_dirs: directory names skipped anywhere in the tree, with everything under them.
      suffix: keep only file names ending with it, e.g. ".py"; None keeps all.
      skip_hidden: also skip files and folders whose names start with "." (e.g. .git).

    Returns:
      Relative posix paths, sorted, so the order is the same on every machine.
    """
    out = []
    for folder, dirs, files in os.walk(root):
        # Pruning in place is what makes this fast: site-packages alone can be 50x the stdlib.
        dirs[:] = [d for d in dirs if d not in exclude_dirs and not (skip_hidden and d.startswith("."))]
        rel = pathlib.PurePath(folder).relative_to(root)
        for name in files:
            if suffix is not None and not name.endswith(suffix):
                continue
            if skip_hidden and name.startswith("."):
                continue
            out.append((rel / name).as_posix())
    return sorted(out)


def is_text(content: bytes) -> bool:
    """Whether content is UTF-8 text; NUL bytes count as binary since NUL separates documents."""
    if b"\x00" in content:
        return False
    try:
        content.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_folder(root: pathlib.Path) -> tuple[list[Document], int]:
    """Reads every UTF-8 text file under root, recursively.

    Hidden files and folders (names starting with ".") and __pycache__ are skipped; so are
    empty files, which hold no text.

    Args:
      root: an existing folder.

    Returns:
      (documents sorted by relative posix path, number of non-text files skipped).
    """
    docs, skipped = [], 0
    for rel in list_files(root, frozenset({"__pycache__"}), skip_hidden=True):
        content = (root / rel).read_bytes()
        if not content:
            continue
        if is_text(content):
            docs.append((rel, content))
        else:
            skipped += 1
    if not docs:
        raise DataError(
            f"folder {root} has no UTF-8 text files ({skipped} non-text files skipped); "
            "add .txt/.md/.py files or pass another folder"
        )
    return docs, skipped


def read_text_file(path: pathlib.Path) -> bytes:
    """Reads one UTF-8 text file.

    Args:
      path: an existing file.

    Returns:
      Its bytes, non-empty.
    """
    content = path.read_bytes()
    if not content.strip():
        raise DataError(f"file {path} is empty; pass a file with text in it")
    if not is_text(content):
        raise DataError(
            f"file {path} is not UTF-8 text (it has invalid UTF-8 or NUL bytes); "
            "pass a text file, a folder of text files or a .jsonl file"
        )
    return content


def read_jsonl(path: pathlib.Path, text_field: str, field_flag: str = "text_field") -> list[Document]:
    """Reads the text field of every record of a JSON-lines file; blank lines are ignored.

    Args:
      path: an existing .jsonl file, one JSON object per line.
      text_field: the key that holds each record's text.
      field_flag: the setting that names text_field, for the error messages.

    Returns:
      Documents in file order, keyed by record index ("0", "1", ...), so inserting a blank
      line does not move any record to the other split.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"file {path} is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from e
    docs = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path} line {lineno} is not valid JSON ({e.msg}); "
                f'each line must be one object like {{"{text_field}": "..."}}'
            ) from e
        if not isinstance(record, dict):
            raise DataError(
                f"{path} line {lineno} is a JSON {type(record).__name__}, not an object; "
                f'each line must be one object like {{"{text_field}": "..."}}'
            )
        if text_field not in record:
            keys = ", ".join(repr(k) for k in record) or "none"
            raise DataError(
                f"{path} line {lineno} has no field {text_field!r} (keys present: {keys}); "
                f"set {field_flag} to the key that holds the text"
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path} line {lineno} field {text_field!r} is a {type(text).__name__}, not a string; "
                "store the text as a JSON string"
            )
        # "replace" because JSON may carry lone surrogates ("\ud800") that UTF-8 cannot encode.
        docs.append((str(len(docs)), text.encode("utf-8", errors="replace")))
    if not any(content for _, content in docs):
        raise DataError(f"file {path} has no text in field {text_field!r}; add records with text")
    return docs


ARROW_SUFFIXES = (".parquet", ".arrow", ".feather")


def _import_pyarrow(path: pathlib.Path):
    try:
        import pyarrow as pa  # pylint: disable=import-outside-toplevel
        import pyarrow.ipc  # pylint: disable=import-outside-toplevel,unused-import
        import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise DataError(
            f"reading {path.name} needs pyarrow; install the optional extra: pip install 'moeqjax[data]' "
            "(or pip install pyarrow), or convert the file to .jsonl"
        ) from e
    return pa, pq


def _batches(pa, pq, path: pathlib.Path, text_field: str):
    """Yields (record batch, column names) of a .parquet, .arrow or .feather file, in file order.

    When text_field is not a column, yields (None, column names) once.
    """
    try:
        if path.suffix == ".parquet":
            pfile = pq.ParquetFile(path)
            names = pfile.schema_arrow.names
            if text_field in names:
                # Only the text column is read, a row group at a time.
                for batch in pfile.iter_batches(batch_size=4096, columns=[text_field]):
                    yield batch, names
            else:
                yield None, names
            return
        # .arrow is the IPC file format (Feather v2) or, as HF `datasets` writes it, the stream format.
        try:
            reader = pa.ipc.open_file(path)
            names = reader.schema.names
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_stream(path)
            names = reader.schema.names
            batches = iter(reader)
        if text_field not in names:
            yield None, names
            return
        for batch in batches:
            yield batch, names
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"cannot read {path} as {path.suffix[1:]}: {e}") from e


def read_arrow_table(path: pathlib.Path, text_field: str,
                     field_flag: str = "--config.data.text_field") -> list[Document]:
    """Reads the text column of a .parquet, .arrow (IPC file or stream) or .feather file.

    Record batches are read one at a time and only the text column is decoded, so files with
    large other columns stay cheap. Null texts count as empty records.

    Args:
      path: an existing file.
      text_field: the column that holds each record's text (a string column).
      field_flag: the setting that names text_field, for the error messages.

    Returns:
      Documents in file order keyed by record index ("0", "1", ...), as for .jsonl.
    """
    pa, pq = _import_pyarrow(path)
    docs = []
    for batch, names in _batches(pa, pq, path, text_field):
        if batch is None:
            listed = ", ".join(repr(n) for n in names) or "none"
            raise DataError(
                f"{path} has no column {text_field!r} (columns present: {listed}); "
                f"set {field_flag} to the column that holds the text"
            )
        column = batch.column(batch.schema.get_field_index(text_field))
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise DataError(
                f"{path} column {text_field!r} has type {column.type}, not string; "
                f"set {field_flag} to a text column"
            )
        for text in column.to_pylist():
            docs.append((str(len(docs)), (text or "").encode("utf-8", errors="replace")))
    if not any(content for _, content in docs):
        raise DataError(f"file {path} has no text in column {text_field!r}; add records with text")
    return docs
