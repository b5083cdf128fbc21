"""The bit map draws per-expert codes [L, E] and per-projection codes [L, 3, E] (a row per tensor)."""

import numpy as np
from matplotlib import image

from moeqjax.eval import plots


def test_bit_map_draws_a_row_per_layer_and_projection(tmp_path, monkeypatch):
  drawn = {}
  real = plots.plt.subplots

  def subplots(*args, **kwargs):  # keep the axes to read back what was drawn
    fig, ax = real(*args, **kwargs)
    drawn["ax"] = ax
    return fig, ax

  monkeypatch.setattr(plots.plt, "subplots", subplots)
  per_expert = np.array([[1, 4, 8, 1], [2, 2, 4, 1]])
  plots.plot_bit_map(per_expert, tmp_path / "e.png", "per expert")
  assert [t.get_text() for t in drawn["ax"].get_yticklabels()] == ["0", "1"]
  codes = np.array([[[1, 1, 1, 1], [4, 4, 4, 4], [8, 8, 8, 8]],
                    [[4, 4, 4, 4], [4, 4, 4, 4], [1, 1, 1, 1]]])
  plots.plot_bit_map(codes, tmp_path / "p.png", "per projection")
  ax = drawn["ax"]
  assert [t.get_text() for t in ax.get_yticklabels()] == [
      "0 w_gate", "0 w_in", "0 w_out", "1 w_gate", "1 w_in", "1 w_out"]
  assert ax.get_ylabel() == "layer, projection"
  cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
  assert cells[(2, 3)] == "int8" and cells[(5, 0)] == "ternary" and len(cells) == 24
  # Taller than the per-expert map: one row per (layer, projection).
  assert image.imread(tmp_path / "p.png").shape[0] > image.imread(tmp_path / "e.png").shape[0]
