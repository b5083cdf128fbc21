"""Routing consistency and load metrics on hand-made examples."""

import numpy as np

from moeqjax.eval import expert_load, load_drift_kl, routing_agreement


def test_agreement_hand_example():
  ref = np.array([[[0, 1], [2, 3], [0, 2], [1, 3]]])  # [L=1, T=4, K=2]
  got = np.array([[[1, 0], [2, 0], [3, 1], [1, 3]]])
  r = routing_agreement(ref, got, num_experts=4)
  # overlaps: 2, 1, 0, 2 -> set agreement (1 + .5 + 0 + 1)/4
  np.testing.assert_allclose(r["topk_agree"], [0.625])
  # top-1 equal: 0 vs 1 no, 2 vs 2 yes, 0 vs 3 no, 1 vs 1 yes
  np.testing.assert_allclose(r["top1_agree"], [0.5])
  np.testing.assert_allclose(r["changed_frac"], [0.5])


def test_expert_load_and_drift():
  idx = np.array([[[0, 1], [0, 2]], [[3, 3], [3, 3]]])
  load = expert_load(idx, 4)
  np.testing.assert_allclose(load[0], [0.5, 0.25, 0.25, 0.0])
  np.testing.assert_allclose(load[1], [0, 0, 0, 1.0])
  assert np.allclose(load_drift_kl(load, load), 0.0, atol=1e-12)
  assert load_drift_kl(load[:1], load[1:]).item() > 1.0
