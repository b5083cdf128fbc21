"""The rule-based allocation methods and the one text that says how they are turned into bytes."""

# No imports on purpose: `moeqjax allocate --help` shows this text, and the library's allocation
# uses RULE_METHODS, from this one place.

# paper_router_reversed (most bits to the LARGEST Lambda) tests the direction of the paper's rule;
# router_norm is the paper's rule for a released checkpoint: Lambda = the final router row norm.
RULE_METHODS = ("paper_combined", "paper_router", "paper_router_reversed", "router_norm",
                "frequency", "gate_weight", "random")


def rule_bytes_text(levels: str) -> str:
  """How rule-based methods become bytes, for `allocate --help` and study.md.

  Args:
    levels: what the levels are in this context, e.g. "--levels BH,BL (...) or else ...".

  Returns:
    One paragraph.
  """
  return (f"Rule-based methods ({', '.join(RULE_METHODS)}) are turned into bytes per layer: with "
          "the layer's share B of the byte budget, the first n_high = floor((B - E*bytes_lo) / "
          "(bytes_hi - bytes_lo)) experts of the method's order (clipped to 0..E) get the high "
          "level and the rest the low one, so they never exceed the budget and all spend the same "
          f"bytes. The levels are {levels}. Of codes that cost the same bytes (ternary and int2 "
          "with 2-bit ternary packing), the one with the lower mean weight error in the layer is "
          "used.")
