"""What a finished run recorded (its kind, config sections, teacher and tokenizer), and how a phase that continues it inherits them."""

# A run's config.json is the truth about the run: a phase that reads a finished run (a teacher, a
# student, a PTQ folder) takes the model, quant and phase sections from it, and `--config` and
# `--config.*` overrides only set the new phase. An override that contradicts what the run was
# made with is a one-line error that names the fields, never silently applied or ignored.

from __future__ import annotations

import hashlib
import json
import pathlib
import sys

import ml_collections

from moeqjax.data.tokenizer import copy_tokenizer
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf

CONFIG_RECORD = "config.json"  # the sections a phase ran with, in its workdir
# A run's own copy of its tokenizer files (the run stays movable), as import-hf keeps them.
TOKENIZER_DIR = import_hf.TOKENIZER_DIR
PACKED_MANIFEST = "manifest.json"
# A Switch run's whole config (every section it was started with): the config that the phases
# continuing it start from when no --config is given (starting_config). Not compared on resume.
DEFAULTS = "defaults"
# Keys of a record that say where a run came from, not how it computes: not compared on resume.
PROVENANCE = ("teacher", "tokenizer_sha256", DEFAULTS)
# Sections a run records that say how it is evaluated, not what it trains: a rerun or a phase that
# continues it may change them, and they are not compared on resume.
FREE_SECTIONS = ("eval",)
# Model fields that say how a run computes, not what the weights are: a new phase may set them.
RUNTIME_MODEL_FIELDS = import_hf.HOW_IT_RUNS
# Data fields a new phase may change (evaluate or fine-tune on other text); the tokenizer it may not.
DATA_DEFAULTS = ("path", "valid_fraction", "text_field")
# Seq2seq fields that say which task a phase trains or evaluates on, not what the model is: a
# phase may fine-tune a span-corruption teacher on (source, target) pairs (the paper's protocol:
# pretrained model -> summarization); the sentinel ids are the model's and stay.
SEQ2SEQ_TASK_FIELDS = ("pairs", "source_field", "target_field", "source_len", "target_len",
                       "window", "noise_density", "mean_span_length")

# What each kind of folder is, for messages.
KIND_TEXT = {
    "pretrain": "a `moeqjax pretrain` run",
    "import": "an `moeqjax import-hf` folder",
    "qat": "a `moeqjax qat` student",
    "ptq": "a `moeqjax ptq` student",
    "finetune": "the study's full-precision fine-tune",
    "packed": "a `moeqjax pack` folder",
}


class RunMismatch(config_io.ConfigError):
  """A folder of the wrong kind, or an override that contradicts the run it continues."""


def read_record(folder: pathlib.Path) -> dict | None:
  """The folder's config.json, or None when it has none; a damaged one is a one-line error."""
  path = pathlib.Path(folder) / CONFIG_RECORD
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise RunMismatch(f"{path} is damaged ({e}); the run cannot be read") from None
  if not isinstance(record, dict):
    raise RunMismatch(f"{path} is not a moeqjax run record (not a JSON object)")
  return record


def run_kind(folder: pathlib.Path) -> str | None:
  """"pretrain", "import", "qat", "ptq", "finetune", "packed", or None for no moeqjax run."""
  folder = pathlib.Path(folder)
  if import_hf.is_imported(folder):
    return "import"
  record = read_record(folder)
  if record is None:
    return "packed" if (folder / PACKED_MANIFEST).is_file() else None
  if "ptq" in record:
    return "ptq"
  if "qat" in record and "expert_codes" in record:
    return "qat"
  if "finetune" in record:
    return "finetune"
  if "pretrain" in record:
    return "pretrain"
  return None


def describe(folder: pathlib.Path) -> str:
  kind = run_kind(folder)
  if kind is not None:
    return KIND_TEXT[kind]
  if not pathlib.Path(folder).exists():
    return "a folder that does not exist"
  return "not a moeqjax run (no config.json)"


def require_kind(folder: pathlib.Path, flag: str, kinds: tuple[str, ...], hint: str) -> str:
  """The folder's kind when it is one of `kinds`, else a one-line error that says what it is."""
  kind = run_kind(folder)
  if kind in kinds:
    return kind
  wanted = " or ".join(KIND_TEXT[k] for k in kinds)
  extra = ""
  if kind in ("qat", "ptq"):
    teacher = (read_record(folder) or {}).get("teacher")
    if teacher and "pretrain" in kinds:
      extra = f" (its teacher was {teacher})"
  raise RunMismatch(f"{flag} {folder} is {describe(folder)}, not {wanted}{extra}; {hint}")


def recorded_sections(folder: pathlib.Path) -> dict:
  """The config sections a run recorded ({section: dict}); an imported folder's model and data."""
  folder = pathlib.Path(folder)
  if import_hf.is_imported(folder):
    marker = json.loads((folder / import_hf.IMPORT_MARKER).read_text())
    tokenizer = run_tokenizer(folder)  # none recorded when the checkpoint came without one
    sections = {"model": marker["model"], "data": {"tokenizer": tokenizer} if tokenizer else {}}
    if "seq2seq" in marker:  # a Switch import's sentinels: where its tokenizer has them
      sections["seq2seq"] = marker["seq2seq"]
    return sections
  record = read_record(folder) or {}
  sections = {k: v for k, v in record.items() if isinstance(v, dict) and k not in PROVENANCE}
  if "data" in sections:
    try:
      tokenizer = run_tokenizer(folder)
    except RunMismatch:  # moved away: loading it names the path (make_tokenizer's error)
      tokenizer = sections["data"].get("tokenizer") or ""
    sections["data"] = dict(sections["data"], tokenizer=tokenizer)
  return sections


def run_tokenizer(folder: pathlib.Path) -> str:
  """The tokenizer a run was made with: its own copy, else its recorded path; "" for UTF-8 bytes.

  Raises:
    RunMismatch: the run recorded a tokenizer that is no longer where it was.
  """
  folder = pathlib.Path(folder).absolute()
  own = folder / TOKENIZER_DIR
  if (own / "tokenizer.json").is_file():
    return str(own)
  if import_hf.is_imported(folder):
    return import_hf.imported_tokenizer(folder)
  record = read_record(folder) or {}
  name = (record.get("data") or {}).get("tokenizer") or ""
  if name in ("", "bytes"):
    return ""
  path = pathlib.Path(name)
  for cand in ((path,) if path.is_absolute() else (path, folder / path)):
    if cand.exists():
      return str(cand.absolute())
  raise RunMismatch(f"{folder} was made with the tokenizer {name}, which is no longer there; pass "
                    "--tokenizer with the same tokenizer.json")


def tokenizer_digest(name: str) -> str:
  """sha256 of a tokenizer's tokenizer.json ("bytes" for the byte tokenizer)."""
  if name in ("", "bytes"):
    return "bytes"
  path = pathlib.Path(name)
  file = path / "tokenizer.json" if path.is_dir() else path
  if not file.is_file():
    raise RunMismatch(f"no tokenizer.json at {file}")
  return hashlib.sha256(file.read_bytes()).hexdigest()


def check_same_tokenizer(given: str, recorded: str, flag: str, what: str):
  """A tokenizer given for a run must be the one it was made with (compared by content)."""
  if tokenizer_digest(given) == tokenizer_digest(recorded):
    return
  made = "UTF-8 bytes" if recorded in ("", "bytes") else f"the tokenizer {recorded}"
  now = "UTF-8 bytes" if given in ("", "bytes") else f"{given}"
  raise RunMismatch(f"{flag} {now} does not match {what}, which was made with {made}; a model "
                    "only makes sense with its own tokenizer: drop the flag")


def keep_tokenizer(workdir: pathlib.Path, name: str) -> str:
  """Copies a run's tokenizer files into WORKDIR/tokenizer (so the run stays valid when it or the
  tokenizer moves); returns the copy's path, or "" for bytes."""
  if name in ("", "bytes"):
    return ""
  src = pathlib.Path(name)
  own = pathlib.Path(workdir).absolute() / TOKENIZER_DIR
  if (src if src.is_dir() else src.parent).absolute() != own:
    copy_tokenizer(src, own)
  return str(own)


def _given_sections(overrides: dict[str, str]) -> dict[str, set[str]]:
  """{section: {keys}} that the user set on the command line."""
  given: dict[str, set[str]] = {}
  for dotted in overrides:
    section, _, key = dotted.partition(".")
    given.setdefault(section, set()).add(key.split(".")[0] if key else "")
  return given


def _same(a, b) -> bool:
  return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def inherit(config: ml_collections.ConfigDict, overrides: dict[str, str], folder: pathlib.Path,
            flag: str, sections: tuple[str, ...], *, config_given: bool = False,
            same_task: bool = False):
  """Sets `sections` of `config` to what the run in `folder` recorded (in place).

  Explicit overrides (`--config.<section>.<key>`, `--data`, `--tokenizer`) that differ from the
  record are an error naming every such field, except the fields a new phase may set: the model's
  runtime fields (dispatch, max_seq_len, capacity_factor), data.path / valid_fraction /
  text_field (another corpus) and a Switch run's seq2seq task (SEQ2SEQ_TASK_FIELDS: e.g. pairs
  to fine-tune a span-corruption teacher on). The tokenizer is compared by content, not by path.

  Args:
    config: the new phase's config, with `overrides` already applied.
    overrides: the dotted keys the user gave (values as typed).
    folder: the finished run.
    flag: the flag that named it (for messages), e.g. "--teacher".
    sections: the sections to take ("model", "quant", "data", "pretrain", "qat").
    config_given: whether --config was given (its differing fields are then named in a note).
    same_task: the phase continues this run itself (a rerun or --resume), so the seq2seq task
      fields are not free.
  """
  recorded = recorded_sections(folder)
  given = _given_sections(overrides)
  conflicts, noted = [], []
  for section in sections:
    if section not in recorded:
      continue
    record = recorded[section]
    now = config[section].to_dict() if section in config else {}
    free = {"model": RUNTIME_MODEL_FIELDS, "data": DATA_DEFAULTS,
            "seq2seq": () if same_task else SEQ2SEQ_TASK_FIELDS}.get(section, ())
    if section in FREE_SECTIONS:
      free = tuple(record)
    for key, value in record.items():
      if section == "data" and key == "tokenizer":
        continue  # compared by content below
      if key in now and not _same(now[key], value):
        if key in given.get(section, ()):
          if key not in free:
            conflicts.append(f"{section}.{key}={now[key]!r} (the run has {value!r})")
        elif config_given:
          noted.append(f"{section}.{key}")
    merged = {**now, **record}  # a field the run predates keeps the config's value
    for key in free:
      if key in given.get(section, ()) and key in now:
        merged[key] = now[key]
    if section == "data" and "tokenizer" in record:
      if "tokenizer" in given.get("data", ()):
        try:
          check_same_tokenizer(now.get("tokenizer", ""), merged["tokenizer"], "--tokenizer",
                               f"{flag} {folder}")
        except RunMismatch as e:
          conflicts.append(str(e).split(";")[0])
    with config.unlocked():
      config[section] = ml_collections.ConfigDict(merged)
  if conflicts:
    raise RunMismatch(f"{flag} {folder} was made with another config: " + "; ".join(conflicts)
                      + ". A run's recorded config.json is the truth: drop these overrides (they "
                      "cannot change a finished run) or start a new run")
  if noted:
    print(f"moeqjax: note: {', '.join(noted)} come from {flag} {folder}'s config.json, not from "
          "--config", file=sys.stderr)


def check_same_model(model_a: dict, model_b: dict, what: str):
  """Two runs must hold the same weights (runtime fields aside), else a one-line error."""
  fields = sorted(k for k in set(model_a) | set(model_b)
                  if k not in RUNTIME_MODEL_FIELDS and not _same(model_a.get(k), model_b.get(k)))
  if fields:
    raise RunMismatch(f"{what} have different models (fields differ: {', '.join(fields)})")


def comparable(record: dict) -> dict:
  """A record as compared on resume: provenance dropped, paths absolute, the tokenizer by content."""
  out = {k: v for k, v in record.items() if k not in PROVENANCE and k not in FREE_SECTIONS}
  data = dict(out.get("data") or {})
  if data:
    if data.get("path"):
      data["path"] = str(pathlib.Path(data["path"]).absolute())
    tok = data.get("tokenizer") or ""
    try:
      data["tokenizer"] = tokenizer_digest(tok)
    except RunMismatch:
      data["tokenizer"] = str(pathlib.Path(tok).absolute())
    out["data"] = data
  return json.loads(json.dumps(out, sort_keys=True, default=str))


TEACHER_KINDS = ("pretrain", "import")
STUDENT_KINDS = ("qat", "ptq")
TEACHER_HINT = ("pass the workdir of a finished `moeqjax pretrain` or an `moeqjax import-hf` folder")


def recorded_teacher(folder: pathlib.Path) -> pathlib.Path | None:
  """The teacher a QAT or PTQ run recorded (absolute), or None (a run made before it was recorded)."""
  teacher = (read_record(folder) or {}).get("teacher")
  return pathlib.Path(teacher) if teacher else None


# The sections a phase records about itself (and so reads back when it is rerun or resumed). A
# Switch run also records `seq2seq` (its span corruption) and `eval` (its held-out batches); a
# decoder-only run records neither, so for it these are the sections it always had.
OWN_SECTIONS = {"pretrain": ("model", "data", "seq2seq", "pretrain", "eval"),
                "qat": ("model", "quant", "data", "seq2seq", "qat", "loss", "eval"),
                "ptq": ("model", "quant", "data", "seq2seq", "qat", "loss", "eval")}
# What qat / ptq take from --teacher, and eval from the student (--workdir).
TEACHER_SECTIONS = ("model", "data", "pretrain", "seq2seq", "eval")
STUDENT_SECTIONS = ("model", "quant", "data", "qat", "seq2seq", "eval")


def check_family(config: ml_collections.ConfigDict, folder: pathlib.Path, flag: str):
  """The run in `folder` and `config` must be of one model family (config_io.is_switch: a Switch
  Transformer or a decoder-only MoE), else a one-line error before any section is merged."""
  recorded = recorded_sections(folder).get("model")
  if recorded is None:
    return
  run_switch, now = config_io.is_switch_model(recorded), config_io.is_switch(config)
  if run_switch != now:
    example = "configs/switch_tiny.py" if run_switch else "configs/tiny.py"
    raise RunMismatch(
        f"{flag} {folder} is {config_io.family_name(run_switch)} run but the config is "
        f"{config_io.family_name(now)} config; drop --config (the run's recorded config is used) "
        f"or pass a config of the run's family, e.g. {example}")


# The folder whose recorded config a command starts from when no --config is given.
def _continued_folder(command: str, workdir, teacher):
  if command in ("qat", "ptq"):
    return teacher
  if command in ("pretrain", "eval", "stats", "allocate"):
    return workdir
  return None


def starting_config(command: str, config_path, *, workdir: pathlib.Path | None = None,
                    teacher: pathlib.Path | None = None) -> ml_collections.ConfigDict:
  """The config a command starts from, before its overrides: `--config` when given; else, when the
  run it continues (qat / ptq: --teacher; pretrain, eval, stats, allocate: --workdir) is a Switch
  run, the whole config that run recorded (DEFAULTS), or a Switch import's config.py, so that
  `moeqjax qat --teacher SWITCH_RUN` needs no --config; else the default config
  (configs/tiny.py), as always."""
  if config_path is not None:
    return config_io.load_config(config_path)
  folder = _continued_folder(command, workdir, teacher)
  if folder is not None and import_hf.is_imported(folder):
    imported = import_hf.imported_config(folder)
    if imported is not None:
      return imported
  elif folder is not None:
    try:
      record = read_record(folder) or {}
    except RunMismatch:
      record = {}  # a damaged record is reported by the phase that reads it
    if isinstance(record.get(DEFAULTS), dict):
      return ml_collections.ConfigDict(record[DEFAULTS])
  return config_io.load_config(None)


def continue_config(command: str, config: ml_collections.ConfigDict, overrides: dict[str, str], *,
                    workdir: pathlib.Path | None = None, teacher: pathlib.Path | None = None,
                    init_from: pathlib.Path | None = None,
                    config_given: bool = False) -> pathlib.Path | None:
  """Fills `config` (in place) from the finished runs a phase continues; returns the teacher.

  pretrain / qat / ptq rerun or resumed in a workdir of their own kind: that run's sections.
  qat / ptq: the model, data (tokenizer, default corpus) and pretrain sections of `--teacher`, and
  with `--init-from` the PTQ student's quant section. eval: the student's (`--workdir`) model,
  quant, data and qat sections, and the pretrain section of its teacher (`--teacher`, default the
  one the student recorded), whose model must be the student's. Other commands are unchanged.
  """
  resumes = command in OWN_SECTIONS and workdir is not None and run_kind(workdir) == command

  def inherit_own():
    # A rerun or --resume continues its own run: its recorded sections (after its teacher's, so
    # that its own corpus wins), unless an override contradicts them.
    if resumes:
      check_family(config, workdir, "--workdir")
      inherit(config, overrides, workdir, "--workdir", OWN_SECTIONS[command],
              config_given=config_given, same_task=True)

  if command == "pretrain":
    inherit_own()
  if command in ("qat", "ptq"):
    require_kind(teacher, "--teacher", TEACHER_KINDS, TEACHER_HINT)
    check_family(config, teacher, "--teacher")
    inherit(config, overrides, teacher, "--teacher", TEACHER_SECTIONS, config_given=config_given)
    if init_from is not None:
      require_kind(init_from, "--init-from", ("ptq",),
                   f"make one with `moeqjax ptq --teacher {teacher} --workdir DIR --method gptq`")
      check_same_model(recorded_sections(teacher)["model"], recorded_sections(init_from)["model"],
                       f"--teacher {teacher} and --init-from {init_from}")
      inherit(config, overrides, init_from, "--init-from", ("quant",), config_given=config_given)
    inherit_own()
    return teacher
  if command == "eval":
    require_kind(workdir, "--workdir", STUDENT_KINDS,
                 "pass the --workdir of a finished `moeqjax qat` or `moeqjax ptq`")
    check_family(config, workdir, "--workdir")
    inherit(config, overrides, workdir, "--workdir", STUDENT_SECTIONS, config_given=config_given)
    if teacher is None:
      teacher = recorded_teacher(workdir)
      if teacher is None:
        raise RunMismatch(f"--workdir {workdir} does not record its teacher (made by an older "
                          "moeqjax); pass --teacher")
    require_kind(teacher, "--teacher", TEACHER_KINDS, TEACHER_HINT)
    check_family(config, teacher, "--teacher")
    check_same_model(recorded_sections(workdir)["model"], recorded_sections(teacher)["model"],
                     f"--workdir {workdir} and --teacher {teacher}")
    inherit(config, overrides, teacher, "--teacher", ("pretrain",), config_given=config_given)
    return teacher
  return teacher


# Every section a run may record (stats and allocate read whichever their workdir holds).
RECORDED_SECTIONS = ("model", "quant", "data", "pretrain", "qat", "loss", "seq2seq", "eval")
