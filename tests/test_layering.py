"""The layers stay apart: the library never imports the pipeline or the CLI; the CLI goes through the pipeline."""

import ast
import pathlib

import moeqjax

PACKAGE = pathlib.Path(moeqjax.__file__).resolve().parent
FRONT = ("moeqjax.pipeline", "moeqjax.cli")
# What the CLI may import from the library: argparse-level things only. `alloc.rules` holds the
# help text of `moeqjax allocate --help` (the rule-based method names and how they become bytes).
CLI_ALLOWED = ("moeqjax.alloc.rules",)


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set[str]:
  """Every module imported anywhere in the file (top level and inside functions), absolute."""
  name = _module_name(path)
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  return _imports_in(path.read_text(), package)


def _imports_in(source: str, package: str) -> set[str]:
  tree = ast.parse(source)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      names.add(base)
      # `from moeqjax import pipeline` imports the submodule, not just the package.
      names.update(f"{base}.{a.name}" for a in node.names)
  return names


def _within(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _library_modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    name = _module_name(path)
    if not _within(name, FRONT):
      yield name, path


def test_the_walk_sees_the_library_and_the_pipeline():
  names = {name for name, _ in _library_modules()}
  assert {"moeqjax.quant.quantizers", "moeqjax.train.step", "moeqjax.convert.hf_export",
          "moeqjax.alloc.allocation"} <= names
  assert (PACKAGE / "pipeline" / "qat.py").is_file() and (PACKAGE / "cli.py").is_file()


def test_the_library_never_imports_the_pipeline_or_the_cli():
  bad = {f"{name} imports {imp}" for name, path in _library_modules()
         for imp in _imports(path) if _within(imp, FRONT)}
  assert not bad, ("library modules must not import the pipeline or the CLI (move the workdir or "
                   f"config concern into moeqjax/pipeline/): {sorted(bad)}")


def test_the_pipeline_never_imports_the_cli():
  bad = {f"{_module_name(p)} imports {imp}" for p in sorted((PACKAGE / "pipeline").rglob("*.py"))
         for imp in _imports(p) if _within(imp, ("moeqjax.cli",))}
  assert not bad, sorted(bad)


def test_the_cli_imports_only_the_pipeline():
  imports = {i for i in _imports(PACKAGE / "cli.py") if _within(i, ("moeqjax",))}
  assert any(_within(i, ("moeqjax.pipeline",)) for i in imports)
  bad = {i for i in imports
         if i != "moeqjax" and not _within(i, ("moeqjax.pipeline",) + CLI_ALLOWED)}
  assert not bad, (f"moeqjax.cli imports library internals {sorted(bad)}; go through a "
                   "moeqjax.pipeline module instead")


def test_the_walk_catches_local_and_relative_imports():
  # The checks above only mean something if an import-outside-toplevel or a relative one is seen.
  source = "def f():\n  from moeqjax.pipeline import workdirs\n  from ..pipeline import qat\n"
  found = _imports_in(source, "moeqjax.train")
  assert {"moeqjax.pipeline.workdirs", "moeqjax.pipeline.qat"} <= found
