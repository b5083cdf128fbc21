"""Reading nested param / quant dicts by key path."""

from __future__ import annotations


def get_path(tree, path):
  """tree[path[0]][path[1]]..., or None where a key is missing (or a node is not a dict)."""
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree
