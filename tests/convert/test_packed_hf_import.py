"""Packed inference of HF-imported students (Qwen2-MoE with a shared expert, Mixtral) against fake quant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="building HF checkpoints needs torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="building HF checkpoints needs transformers")

import moeqjax  # noqa: E402
from moeqjax.model import default_quant, set_expert_codes  # noqa: E402
from moeqjax.model import MoETransformer, QuantRules  # noqa: E402
from moeqjax.serve import generate, load_packed, pack  # noqa: E402
from hf_models import build_hf_model, save_hf_model, tokens  # noqa: E402


@pytest.mark.parametrize("family,rules", [
    ("qwen2_moe", QuantRules(expert_code=1, shared_code=4, attn_code=8, granularity="channel")),
    ("mixtral", QuantRules(expert_code=2, granularity="group", group_size=8, symmetric=False)),
])
def test_imported_student_packed_equals_fake_quant(tmp_path, family, rules):
  src = save_hf_model(build_hf_model(family, 4, 2, family == "mixtral"), tmp_path / "src")
  model, params = moeqjax.from_hf(src)
  cfg = model.cfg.replace(quant=rules)
  quant = set_expert_codes(default_quant(cfg), [[1, 2, 4, 8], [3, 1, 1, 2]])
  pack(cfg, params, quant, tmp_path / "packed", fp_dtype="float32")
  served = load_packed(tmp_path / "packed")
  toks = jnp.asarray(tokens(2, 10))
  # Compiled (op by op, these forwards cost seconds more); one program each side.
  want = np.asarray(jax.jit(MoETransformer(cfg).apply)({"params": params, "quant": quant}, toks))
  got = np.asarray(jax.jit(served.model.apply)(served.variables, toks))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Greedy generation from packed weights equals the fake-quant student's.
  student = generate(MoETransformer(cfg), {"params": params, "quant": quant}, tokens(1, 6), 8)
  packed = generate(served.model, served.variables, tokens(1, 6), 8)
  np.testing.assert_array_equal(packed.tokens, student.tokens)
