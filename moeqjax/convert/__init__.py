"""Hugging Face checkpoint import and export (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE)."""

from moeqjax.convert.errors import ConvertError
from moeqjax.convert.hf_config import (SUPPORTED_MODEL_TYPES, hf_config_to_model_config,
                                       model_config_to_hf_config)
from moeqjax.convert.hf_import import from_hf, load_hf_params, read_hf_config
from moeqjax.convert.hf_export import export_hf, hf_state_dict

__all__ = ["ConvertError", "SUPPORTED_MODEL_TYPES", "export_hf", "from_hf",
           "hf_config_to_model_config", "hf_state_dict", "load_hf_params",
           "model_config_to_hf_config", "read_hf_config"]
