"""`moeqjax plan`: parameter counts, weight bytes and QAT memory of a config, with nothing allocated."""

from moeqjax.convert.plan import format_plan, plan
from moeqjax.pipeline import config as config_io


def plan_text(config) -> str:
  """The memory plan of `config`'s model and QAT batch, as printed by `moeqjax plan`."""
  cfg = config_io.model_config(config)
  return format_plan(cfg, plan(cfg, config.qat.batch_size, config.qat.seq_len))
