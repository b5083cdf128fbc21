"""Flax linen MoE language model: config, layers, routing, experts and the transformer."""

from moeqjax.model.codes import default_quant, expert_codes, set_expert_codes
from moeqjax.model.config import ModelConfig, QuantRules
from moeqjax.model.ratios import init_ratios, without_ratios
from moeqjax.model.transformer import (AUX_KEYS, MoETransformer, forward_with_aux, init_model,
                                       param_axes, routing_aux)

__all__ = ["ModelConfig", "QuantRules", "MoETransformer", "AUX_KEYS", "forward_with_aux",
           "init_model", "param_axes", "routing_aux", "default_quant", "expert_codes",
           "set_expert_codes", "init_ratios", "without_ratios"]
