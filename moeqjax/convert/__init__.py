"""Hugging Face checkpoint import and export (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE; Switch via *_switch)."""

from moeqjax.convert.errors import ConvertError
from moeqjax.convert.hf_config import (SUPPORTED_MODEL_TYPES, hf_config_to_model_config,
                                       model_config_to_hf_config)
from moeqjax.convert.hf_import import from_hf, load_hf_params, read_hf_config
from moeqjax.convert.hf_export import export_hf, hf_state_dict
from moeqjax.convert.switch_hf import export_hf_switch, from_hf_switch

__all__ = ["ConvertError", "SUPPORTED_MODEL_TYPES", "export_hf", "export_hf_switch", "from_hf",
           "from_hf_switch",
           "hf_config_to_model_config", "hf_state_dict", "load_hf_params",
           "model_config_to_hf_config", "read_hf_config"]
