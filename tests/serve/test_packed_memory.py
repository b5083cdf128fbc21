"""After load_packed, device memory holds the packed bytes, not a float copy of the experts."""

import jax
import numpy as np

from conftest import tiny_model_config
from moeqjax.model import default_quant, set_expert_codes
from moeqjax.model import QuantRules, init_model
from moeqjax.serve import load_packed, pack


def test_live_arrays_hold_no_float_copy_of_the_experts(tmp_path):
  # Experts dominate this model, so a float copy of them would show in the live bytes.
  cfg = tiny_model_config(quant=QuantRules(expert_code=1), d_model=32, d_ff=256, num_experts=8,
                          vocab_size=32)
  _, params, _ = init_model(cfg, jax.random.key(0))
  quant = set_expert_codes(default_quant(cfg), [[1] * 8, [1, 1, 2, 2, 3, 3, 4, 8]])
  manifest = pack(cfg, params, quant, tmp_path / "p")
  del params, quant
  before = {id(a) for a in jax.live_arrays()}
  served = load_packed(tmp_path / "p")
  new = [a for a in jax.live_arrays() if id(a) not in before]
  live = sum(a.nbytes for a in new)
  on_disk = manifest["bytes"]["all_tensors"]
  assert on_disk <= live <= 1.1 * on_disk, (live, on_disk)
  float_expert_bytes = sum(np.prod(s) * 2 for s in ((8, 32, 256),) * 3) * 2  # bf16, 2 layers
  assert live < 0.5 * float_expert_bytes
  # Expert bytes on disk equal the memory accounting, to the byte.
  assert manifest["bytes"]["expert_tensors_on_disk"] == manifest["bytes"]["expert_bytes_accounted"]
  assert served.variables["packed"]["layers_0"]["moe"]["w_in"]["values"].dtype == np.uint8
