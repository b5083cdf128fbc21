"""Experiment configs: load a `configs/*.py` file, apply `--config.<key>=<value>` overrides, build dataclasses."""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import pathlib

import ml_collections

from moeqjax.model import ModelConfig, QuantRules, SwitchConfig
from moeqjax.objectives import LossWeights
from moeqjax.train import LoopConfig, OptimConfig
from moeqjax.train.mesh import MeshConfig

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "tiny.py"


class ConfigError(ValueError):
  """A user error in a config file or override; the message says how to fix it."""


def load_config(path: str | pathlib.Path | None) -> ml_collections.ConfigDict:
  """Imports `path` (a Python file with get_config()) and returns its ConfigDict."""
  path = pathlib.Path(path) if path else _default_config_path()
  if not path.is_file():
    raise ConfigError(f"config file {path} does not exist; pass --config configs/<name>.py")
  spec = importlib.util.spec_from_file_location(f"moeqjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path} has no get_config() function")
  return module.get_config()


def _default_config_path() -> pathlib.Path:
  if not DEFAULT_CONFIG.is_file():
    raise ConfigError(f"the default config {DEFAULT_CONFIG} is not there (moeqjax was installed "
                      "without its repo); pass --config path/to/config.py")
  return DEFAULT_CONFIG


def _parse_value(text: str, current):
  if isinstance(current, bool):
    low = text.lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ConfigError(f"expected true/false, got {text!r}")
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError as e:
      raise ConfigError(f"expected an integer, got {text!r}") from e
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError as e:
      raise ConfigError(f"expected a number, got {text!r}") from e
  if isinstance(current, str):
    return text
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]):
  """Sets dotted keys from strings, typed like the current value. Unknown keys are errors."""
  for dotted, text in overrides.items():
    node, parts = config, dotted.split(".")
    for depth, part in enumerate(parts):
      valid = sorted(node.keys())
      if part not in valid:
        where = ".".join(parts[:depth]) or "the top level"
        raise ConfigError(f"unknown config key {dotted!r}: {part!r} is not in {where}; valid keys "
                          f"there: {', '.join(valid)}")
      if depth < len(parts) - 1:
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
          raise ConfigError(f"config key {'.'.join(parts[:depth + 1])} is a value, not a section")
    try:
      value = _parse_value(text, node[parts[-1]])
    except ConfigError as e:
      raise ConfigError(f"--config.{dotted}: {e}") from None
    with node.unlocked():
      node[parts[-1]] = value


def _build(cls, section: ml_collections.ConfigDict, name: str, **extra):
  fields = {f.name for f in dataclasses.fields(cls)} - set(extra)
  given = set(section.keys())
  unknown, missing = given - fields, {
      f.name for f in dataclasses.fields(cls)
      if f.name not in given and f.name not in extra and
      f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
  if unknown:
    raise ConfigError(f"config section {name!r} has unknown keys {sorted(unknown)}; valid keys: "
                      f"{sorted(fields)}")
  if missing:
    raise ConfigError(f"config section {name!r} is missing keys {sorted(missing)}")
  try:
    return cls(**section.to_dict(), **extra)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config section {name!r}: {e}") from None


def model_config(config) -> ModelConfig:
  return _build(ModelConfig, config.model, "model", quant=_build(QuantRules, config.quant, "quant"))


def switch_config(config) -> SwitchConfig:
  """The `model` + `quant` sections of a Switch config (configs/switch_*.py) as a SwitchConfig."""
  return _build(SwitchConfig, config.model, "model", quant=_build(QuantRules, config.quant, "quant"))


# The model family is decided here, at the pipeline level, from the config alone: a `model` section
# with a `num_decoder_layers` field is a Switch Transformer (encoder-decoder; SwitchConfig), any
# other is a decoder-only MoE (ModelConfig). The model layers never branch on a family name.
SWITCH_MARKER = "num_decoder_layers"


def is_switch_model(model: dict) -> bool:
  """Whether a `model` section (a dict, e.g. a run's recorded one) is a Switch Transformer's."""
  return SWITCH_MARKER in (model or {})


def is_switch(config) -> bool:
  """Whether `config` is a Switch Transformer (encoder-decoder) config: its model section has
  `num_decoder_layers` (configs/switch_*.py); else a decoder-only MoE config (configs/tiny.py)."""
  return "model" in config and is_switch_model(config.model.to_dict())


def family_name(switch: bool) -> str:
  return "a Switch Transformer (encoder-decoder)" if switch else "a decoder-only MoE"


def any_model_config(config) -> ModelConfig | SwitchConfig:
  """The model config of either family (switch_config or model_config), validated."""
  return switch_config(config) if is_switch(config) else model_config(config)


def mesh_config(config) -> MeshConfig:
  """The `mesh` section (absent: every device on the data axis, which is today's run on one)."""
  if "mesh" not in config:
    return MeshConfig()
  return _build(MeshConfig, config.mesh, "mesh")


def loss_weights(config) -> LossWeights:
  return _build(LossWeights, config.loss, "loss")


_LOOP_KEYS = ("steps", "batch_size", "seq_len", "seed", "log_every", "ckpt_every")
_OPTIM_KEYS = ("learning_rate", "warmup_steps", "end_lr_fraction", "weight_decay", "grad_clip")


def phase_configs(section, name: str) -> tuple[LoopConfig, OptimConfig]:
  """A training phase section (pretrain or qat) -> (loop, optimizer) configs."""
  known = set(_LOOP_KEYS) | set(_OPTIM_KEYS)
  unknown = set(section.keys()) - known
  if unknown:
    raise ConfigError(f"config section {name!r} has unknown keys {sorted(unknown)}; valid keys: "
                      f"{sorted(known)}")
  missing = known - set(section.keys())
  if missing:
    raise ConfigError(f"config section {name!r} is missing keys {sorted(missing)}")
  try:
    loop = LoopConfig(**{k: section[k] for k in _LOOP_KEYS})
    optim = OptimConfig(total_steps=section.steps, **{k: section[k] for k in _OPTIM_KEYS})
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config section {name!r}: {e}") from None
  return loop, optim


def config_json(config) -> str:
  return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)
