"""The model's `quant` collection of bit codes: defaults from the rules, and expert codes ([L, E] or [L, 3, E]) in and out."""

# L counts MoE blocks in model.moe_paths order: a decoder-only model's layers; a Switch
# Transformer's sparse layers, the encoder's then the decoder's (row i of an [L_sparse, E] table is
# the i-th sparse layer of the encoder, then of the decoder after those).

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from moeqjax.model.config import SwitchConfig
from moeqjax.model.moe_paths import moe_paths
from moeqjax.model.projection_codes import NUM_PROJECTIONS, PROJECTIONS, is_per_projection
from moeqjax.model.switch import SwitchTransformer
from moeqjax.model.transformer import MoETransformer
from moeqjax.quant import validate_codes

EXPERT_BITS = "expert_bits"


def default_quant(cfg):
  """The `quant` collection with every code at the rules' defaults (no params allocated).

  Args:
    cfg: a ModelConfig (decoder-only) or a SwitchConfig (encoder-decoder).
  """
  if isinstance(cfg, SwitchConfig):
    ids = jnp.zeros((1, 4), jnp.int32)
    abstract = jax.eval_shape(SwitchTransformer(cfg).init, jax.random.key(0), ids, ids)
  else:
    abstract = jax.eval_shape(MoETransformer(cfg).init, jax.random.key(0),
                              jnp.zeros((1, 8), jnp.int32))
  shapes = nn.meta.unbox(abstract)["quant"]
  return _fill_codes(shapes, cfg.quant)


def _fill_codes(shapes, rules):
  # The collection mirrors the module tree; leaf names tell which rule a code belongs to.

  def fill(path, leaf):
    names = [p.key for p in path]
    if names[-1] == EXPERT_BITS:
      code = rules.expert_code
    elif any(n == "attn" or n.endswith("_attn") for n in names):  # attn, self_attn, cross_attn
      code = rules.attn_code
    elif "shared_expert" in names or "dense_mlp" in names:  # Switch's dense FFNs: shared rule
      code = rules.shared_code
    elif "router" in names:
      code = rules.router_code
    elif "lm_head" in names:
      code = rules.lm_head_code
    else:
      raise ValueError(f"no quantization rule for {'/'.join(names)}")
    return jnp.full(leaf.shape, code, jnp.int32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _rows(quant):
  rows = []
  for path in moe_paths(quant, EXPERT_BITS):
    node = quant
    for key in path:
      node = node[key]
    rows.append(np.asarray(node[EXPERT_BITS]))
  return rows


def expert_codes(quant, num_layers: int | None = None) -> np.ndarray:
  """The expert bit codes held in a `quant` collection: [L, E], or [L, 3, E] when any layer holds
  per-projection codes (layers with [E] codes are then repeated over the three projections).

  Args:
    quant: a `quant` collection (decoder-only or Switch).
    num_layers: the MoE blocks the caller expects (checked), or None to take them all.
  """
  rows = _rows(quant)
  if num_layers is not None and len(rows) != num_layers:
    raise ValueError(f"the quant collection holds {len(rows)} MoE layers' codes, not "
                     f"{num_layers}")
  if not rows:
    raise ValueError("the quant collection holds no expert codes (no MoE layer is quantized)")
  if any(r.ndim == 2 for r in rows):
    rows = [np.broadcast_to(r, (NUM_PROJECTIONS, r.shape[-1])) for r in rows]
  return np.stack(rows)


def set_expert_codes(quant, codes) -> dict:
  """A copy of `quant` with the expert codes replaced (shapes checked).

  Args:
    quant: a `quant` collection.
    codes: [L, E] (one code per expert for its three matrices) or [L, 3, E] (one per projection,
      rows in model.projection_codes.PROJECTIONS order: w_gate, w_in, w_out). L counts MoE
      blocks in model.moe_paths order (a Switch model: encoder sparse layers, then decoder's).
  """
  codes = validate_codes(np.asarray(codes))
  paths = moe_paths(quant, EXPERT_BITS)
  current = expert_codes(quant)
  try:
    per_projection = is_per_projection(codes)
  except ValueError:
    per_projection = None
  want = (current.shape[0], current.shape[-1])
  if per_projection is None or (codes.shape[0], codes.shape[-1]) != want:
    raise ValueError(f"allocation has shape {codes.shape}; this model needs [num_layers, "
                     f"num_experts] = {list(want)} or [num_layers, {NUM_PROJECTIONS}, num_experts] "
                     f"(rows {', '.join(PROJECTIONS)}), one row per MoE layer in the order "
                     f"{', '.join('/'.join(p[:-1]) for p in paths)}")
  new = jax.tree.map(lambda x: x, quant)
  for i, path in enumerate(paths):
    node = new
    for key in path:  # copy the dicts on the way down; the other branches are shared
      node[key] = dict(node[key])
      node = node[key]
    node[EXPERT_BITS] = jnp.asarray(codes[i], jnp.int32)
  return new
