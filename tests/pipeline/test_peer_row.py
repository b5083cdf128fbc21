"""A peer-table row: mean ± std over seeds, stored bits, and the like-for-like note."""

import time

import numpy as np

from conftest import tiny_model_config
from moeqjax.alloc.allocation import achieved
from moeqjax.pipeline.study_peers import _peer_row


def test_peer_row_summarises_seeds_and_bits():
  cfg = tiny_model_config()
  results = [{"bits_per_byte": 2.0, "topk_agree": 0.8}, {"bits_per_byte": 2.2, "topk_agree": 0.9}]
  row = _peer_row(cfg, 4, results, time.perf_counter(), "reference row")
  np.testing.assert_allclose(row["bits_per_byte"]["mean"], 2.1)
  np.testing.assert_allclose(row["topk_agree"]["mean"], 0.85)
  assert row["bits_per_byte"]["std"] > 0
  assert row["expert_code_bits"] == 4.0
  want = achieved(cfg, np.full((cfg.num_layers, cfg.num_experts), 4))["bits_per_weight"]
  assert row["expert_bits_per_weight"] == want > 4.0  # scales add to the 4 code bits
  assert row["like_for_like"] == "reference row" and row["seconds"] >= 0
