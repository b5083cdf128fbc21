"""evaluate_lm's progress bar: drawn on stderr with its label past the delay, never without one."""

import jax
import numpy as np

from conftest import tiny_model_config
from moeqjax.eval import lm_eval
from moeqjax.model import init_model


def test_progress_bar_only_with_a_label(capsys, monkeypatch):
  cfg = tiny_model_config()
  params = init_model(cfg, jax.random.key(0))[1]
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(5, 9)).astype(np.int32)
  monkeypatch.setattr(lm_eval, "BAR_DELAY_S", 0.0)
  quiet = lm_eval.evaluate_lm(cfg, {"params": params}, windows, 2)
  assert capsys.readouterr().err == ""
  shown = lm_eval.evaluate_lm(cfg, {"params": params}, windows, 2, desc="eval student")
  err = capsys.readouterr().err
  assert "eval student:" in err and "/3 [" in err  # 5 windows in batches of 2: 3 batches
  assert shown["nll"] == quiet["nll"]
  monkeypatch.setattr(lm_eval, "BAR_DELAY_S", 60.0)  # a short evaluation stays silent
  lm_eval.evaluate_lm(cfg, {"params": params}, windows, 2, desc="eval student")
  assert capsys.readouterr().err == ""
