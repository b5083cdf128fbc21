"""Flax linen MoE language models: config, layers, routing, experts, the transformer and Switch."""

from moeqjax.model.codes import default_quant, expert_codes, set_expert_codes
from moeqjax.model.config import ModelConfig, QuantRules, SwitchConfig
from moeqjax.model.ratios import init_ratios, without_ratios
from moeqjax.model.transformer import (AUX_KEYS, MoETransformer, forward_with_aux, init_model,
                                       param_axes, routing_aux)
from moeqjax.model.switch import SwitchTransformer, init_switch

__all__ = ["ModelConfig", "QuantRules", "MoETransformer", "AUX_KEYS", "forward_with_aux",
           "init_model", "param_axes", "routing_aux", "default_quant", "expert_codes",
           "set_expert_codes", "init_ratios", "without_ratios", "SwitchConfig",
           "SwitchTransformer", "init_switch"]
