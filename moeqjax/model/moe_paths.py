"""Where the MoE blocks sit in a param or `quant` tree, in one fixed order for every model family."""

# Codes, ratios and router statistics are per MoE block. A decoder-only model holds its blocks at
# layers_i/moe; a Switch Transformer at encoder/layers_i/moe and decoder/layers_i/moe (its sparse
# layers only). The order, shared by every [L_moe, E] table, is: the encoder's blocks before the
# decoder's, and inside a stack by layer index (numerically: layers_10 after layers_2).

from __future__ import annotations

import re
from collections.abc import Mapping

STACK_ORDER = ("encoder", "decoder")
_LAYER = re.compile(r"layers_(\d+)$")


def _order_key(path: tuple[str, ...]):
  def part(name):
    if name in STACK_ORDER:
      return (0, STACK_ORDER.index(name), "")
    match = _LAYER.match(name)
    if match:
      return (1, int(match.group(1)), "")
    return (2, 0, name)
  return tuple(part(name) for name in path)


def moe_paths(tree, leaf: str) -> list[tuple[str, ...]]:
  """Key paths of the dicts in `tree` that hold a `leaf` entry, in the MoE-block order above.

  Args:
    tree: a nested dict (params, grads or a `quant` collection).
    leaf: the entry that marks an MoE block: "expert_bits" in a `quant` collection, "router" in
      params or grads.
  """
  found = []

  def walk(node, path):
    if leaf in node:
      found.append(path)
      return
    for key, child in node.items():
      if isinstance(child, Mapping):
        walk(child, path + (str(key),))

  walk(tree, ())
  return sorted(found, key=_order_key)


def at_path(tree, path: tuple[str, ...]):
  """The node of `tree` at a key path."""
  for key in path:
    tree = tree[key]
  return tree


def path_name(path: tuple[str, ...]) -> str:
  """A block's path as a metric suffix, e.g. "encoder/layers_1"; a trailing "moe" is dropped."""
  return "/".join(path[:-1] if path and path[-1] == "moe" else path)
