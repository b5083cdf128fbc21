"""The model's `quant` collection of bit codes: defaults from the rules, and per-expert codes in and out."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moeqjax.model.transformer import MoETransformer
from moeqjax.quant import validate_codes


def default_quant(cfg):
  """The `quant` collection with every code at the rules' defaults (no params allocated)."""
  model = MoETransformer(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  shapes = nn.meta.unbox(abstract)["quant"]
  return _fill_codes(shapes, cfg.quant)


def _fill_codes(shapes, rules):
  # The collection mirrors the module tree; leaf names tell which rule a code belongs to.

  def fill(path, leaf):
    names = [p.key for p in path]
    if names[-1] == "expert_bits":
      code = rules.expert_code
    elif "attn" in names:
      code = rules.attn_code
    elif "shared_expert" in names:
      code = rules.shared_code
    elif "router" in names:
      code = rules.router_code
    elif "lm_head" in names:
      code = rules.lm_head_code
    else:
      raise ValueError(f"no quantization rule for {'/'.join(names)}")
    return jnp.full(leaf.shape, code, jnp.int32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def expert_codes(quant, num_layers: int) -> np.ndarray:
  """The expert bit codes [L, E] held in a `quant` collection."""
  return np.stack([np.asarray(quant[f"layers_{i}"]["moe"]["expert_bits"])
                   for i in range(num_layers)])


def set_expert_codes(quant, codes_LxE) -> dict:
  """A copy of `quant` with the expert codes replaced (shapes checked)."""
  codes_LxE = validate_codes(np.asarray(codes_LxE))
  num_layers = len([k for k in quant if k.startswith("layers_")])
  current = expert_codes(quant, num_layers)
  if codes_LxE.shape != current.shape:
    raise ValueError(f"allocation has shape {codes_LxE.shape}; this model needs "
                     f"[num_layers, num_experts] = {list(current.shape)}")
  new = jax.tree.map(lambda x: x, quant)
  for i in range(num_layers):
    new[f"layers_{i}"] = dict(new[f"layers_{i}"])
    new[f"layers_{i}"]["moe"] = dict(new[f"layers_{i}"]["moe"])
    new[f"layers_{i}"]["moe"]["expert_bits"] = jnp.asarray(codes_LxE[i], jnp.int32)
  return new
