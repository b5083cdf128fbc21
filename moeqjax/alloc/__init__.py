"""Per-expert sensitivity scores and bit-allocation rules and solvers (pure numpy)."""

from moeqjax.alloc.baselines import by_frequency
from moeqjax.alloc.baselines import by_gate_weight
from moeqjax.alloc.baselines import mc_moe
from moeqjax.alloc.baselines import mc_moe_importance
from moeqjax.alloc.baselines import random_alloc
from moeqjax.alloc.baselines import uniform
from moeqjax.alloc.budget import budget_from_bits
from moeqjax.alloc.budget import bytes_table
from moeqjax.alloc.budget import num_expert_weights
from moeqjax.alloc.paper import NOMINAL_BITS
from moeqjax.alloc.paper import allocate_by_order
from moeqjax.alloc.paper import allocate_layers
from moeqjax.alloc.paper import mean_bits
from moeqjax.alloc.paper import three_level
from moeqjax.alloc.paper import three_level_counts
from moeqjax.alloc.paper import two_level
from moeqjax.alloc.sensitivity import combined_order
from moeqjax.alloc.sensitivity import combined_order_layers
from moeqjax.alloc.sensitivity import grad_sensitivity
from moeqjax.alloc.sensitivity import neuron_variance
from moeqjax.alloc.sensitivity import router_norm_change
from moeqjax.alloc.sensitivity import router_row_norms
from moeqjax.alloc.sensitivity import sensitivity_order
from moeqjax.alloc.solver import allocation_totals
from moeqjax.alloc.solver import solve_exact

__all__ = [
    "NOMINAL_BITS",
    "allocate_by_order",
    "allocate_layers",
    "allocation_totals",
    "budget_from_bits",
    "by_frequency",
    "by_gate_weight",
    "bytes_table",
    "combined_order",
    "combined_order_layers",
    "grad_sensitivity",
    "mc_moe",
    "mc_moe_importance",
    "mean_bits",
    "neuron_variance",
    "num_expert_weights",
    "random_alloc",
    "router_norm_change",
    "router_row_norms",
    "sensitivity_order",
    "solve_exact",
    "three_level",
    "three_level_counts",
    "two_level",
    "uniform",
]
