"""The model's `quant` collection of bit codes: defaults from the rules, and expert codes ([L, E] or [L, 3, E]) in and out."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moeqjax.model.projection_codes import NUM_PROJECTIONS, PROJECTIONS, is_per_projection
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
  """The expert bit codes held in a `quant` collection: [L, E], or [L, 3, E] when any layer holds
  per-projection codes (layers with [E] codes are then repeated over the three projections)."""
  rows = [np.asarray(quant[f"layers_{i}"]["moe"]["expert_bits"]) for i in range(num_layers)]
  if any(r.ndim == 2 for r in rows):
    rows = [np.broadcast_to(r, (NUM_PROJECTIONS, r.shape[-1])) for r in rows]
  return np.stack(rows)


def set_expert_codes(quant, codes) -> dict:
  """A copy of `quant` with the expert codes replaced (shapes checked).

  Args:
    quant: a `quant` collection.
    codes: [L, E] (one code per expert for its three matrices) or [L, 3, E] (one per projection,
      rows in model.projection_codes.PROJECTIONS order: w_gate, w_in, w_out).
  """
  codes = validate_codes(np.asarray(codes))
  num_layers = len([k for k in quant if k.startswith("layers_")])
  current = expert_codes(quant, num_layers)
  try:
    per_projection = is_per_projection(codes)
  except ValueError:
    per_projection = None
  want = (current.shape[0], current.shape[-1])
  if per_projection is None or (codes.shape[0], codes.shape[-1]) != want:
    raise ValueError(f"allocation has shape {codes.shape}; this model needs [num_layers, "
                     f"num_experts] = {list(want)} or [num_layers, {NUM_PROJECTIONS}, num_experts] "
                     f"(rows {', '.join(PROJECTIONS)})")
  new = jax.tree.map(lambda x: x, quant)
  for i in range(num_layers):
    new[f"layers_{i}"] = dict(new[f"layers_{i}"])
    new[f"layers_{i}"]["moe"] = dict(new[f"layers_{i}"]["moe"])
    new[f"layers_{i}"]["moe"]["expert_bits"] = jnp.asarray(codes[i], jnp.int32)
  return new
