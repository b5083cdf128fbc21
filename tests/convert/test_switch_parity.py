"""Switch Transformer import/export parity against transformers (torch CPU): logits, routing, losses, generation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch", reason="Switch parity tests need torch (pip install -e .[parity])")
pytest.importorskip("transformers", reason="Switch parity tests need transformers (.[parity])")

from moeqjax.convert import ConvertError, export_hf_switch, from_hf_switch
from moeqjax.model import QuantRules
from moeqjax.model.routing import switch_router_losses
from moeqjax.serve import switch_greedy
from switch_models import build_switch_model, hf_forward, tokens

# HF config fields of each case; expert_capacity 2 or 3 drops tokens of the 12-token sequences.
CASES = [
    dict(num_experts=4, expert_capacity=64),
    dict(num_experts=8, num_layers=4, num_sparse_encoder_layers=2, num_decoder_layers=3,
         num_sparse_decoder_layers=1, expert_capacity=2, router_bias=True),
    dict(num_experts=3, num_layers=3, num_sparse_encoder_layers=3, num_sparse_decoder_layers=2,
         expert_capacity=4, tie_word_embeddings=False),
    # transformers' generate sizes its cache by num_layers (IndexError when the decoder has more
    # layers), so the stacks here are equally deep.
    dict(num_experts=2, num_layers=4, num_sparse_encoder_layers=1, num_decoder_layers=4,
         num_sparse_decoder_layers=2, expert_capacity=3, router_bias=True, d_model=24, d_kv=6,
         num_heads=3),
]
IDS = ["E4-cap64", "E8-steps2,3-cap2-bias", "E3-all-sparse-cap4-untied", "E2-steps4,2-cap3-bias-H3"]


# One torch model and one import per case for the whole module (the quantized-student test below
# reuses case 1's).
_IMPORTED = {}


def _import_case(index, tmp_path_factory):
  if index not in _IMPORTED:
    hf = build_switch_model(**CASES[index])
    path = tmp_path_factory.mktemp(IDS[index])
    hf.save_pretrained(path)
    model, params = from_hf_switch(path)
    _IMPORTED[index] = hf, model, params
  return _IMPORTED[index]


@pytest.fixture(scope="module", params=range(len(CASES)), ids=IDS)
def imported(request, tmp_path_factory):
  return _import_case(request.param, tmp_path_factory)


# The unpadded comparisons all run batches of these shapes (encoder 12 tokens, decoder 7: unequal
# lengths, so a reshape that mixes the stacks up fails), so each model's forward compiles once.
B, ENC, DEC = 3, 12, 7
_APPLY = {}


def _ours(model, variables, enc, dec, mask=None):
  """Our logits and aux, through one jitted apply per model (a new jax.jit wrapper recompiles)."""
  if id(model) not in _APPLY:
    _APPLY[id(model)] = model, jax.jit(model.apply)
  logits, aux = _APPLY[id(model)][1](variables, jnp.asarray(enc), jnp.asarray(dec),
                                     None if mask is None else jnp.asarray(mask))
  return np.asarray(logits), aux


def _hf_sparse_logits(router_logits, sparse_layers):
  """transformers' router logits of the sparse layers, stacked [L_sparse, B, S, E]."""
  assert len(router_logits) == len(sparse_layers)
  return np.stack([r.numpy() for r in router_logits])


def test_logits_routing_drops_and_router_losses_match(imported):
  """One forward of each side: logits, router logits, top-1 experts, drops, z and aux losses."""
  hf, model, params = imported
  enc, dec = tokens(B, ENC), tokens(B, DEC, seed=1)
  theirs = hf_forward(hf, enc, dec)
  ours, aux = _ours(model, {"params": params}, enc, dec)
  assert np.abs(theirs.logits.numpy()).max() > 0.5, "logits too small for a meaningful comparison"
  assert np.abs(ours - theirs.logits.numpy()).max() <= 1e-4
  cfg = model.cfg
  for stack, layers, hf_logits in (
      ("encoder", cfg.encoder_sparse_layers, theirs.encoder_router_logits),
      ("decoder", cfg.decoder_sparse_layers, theirs.decoder_router_logits)):
    want = _hf_sparse_logits(hf_logits, layers)
    got = np.asarray(aux[stack]["router_logits"]).reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.asarray(aux[stack]["expert_idx"])[..., 0],
                                  want.argmax(-1).reshape(len(layers), -1))
  if cfg.expert_capacity < ENC:
    # The small capacities drop tokens of these sequences: the comparison covers dropped tokens.
    assert float(np.max(aux["encoder"]["drop_rate"])) > 0
  for stack, seq in (("encoder", ENC), ("decoder", DEC)):
    if getattr(hf.config, f"{stack}_sparse_step") == 1:
      # transformers reports 0 when every layer of a stack is sparse (its `sparse_step > 1`
      # test); ours computes the losses, so there is nothing to compare.
      continue
    logits = np.asarray(aux[stack]["router_logits"])
    z, lb = switch_router_losses(jnp.asarray(logits.reshape(logits.shape[0], B, seq, -1)))
    np.testing.assert_allclose(float(z), float(getattr(theirs, f"{stack}_z_loss")), rtol=1e-5)
    np.testing.assert_allclose(float(lb), float(getattr(theirs, f"{stack}_aux_loss")), rtol=1e-5)


def test_padded_encoder_matches(imported):
  hf, model, params = imported
  enc, dec = tokens(2, 10, seed=2), tokens(2, 5, seed=3)
  mask = np.ones((2, 10), np.int64)
  mask[1, 6:] = 0
  theirs = hf_forward(hf, enc, dec, mask).logits.numpy()
  ours, _ = _ours(model, {"params": params}, enc, dec, mask.astype(bool))
  assert np.abs(ours - theirs).max() <= 1e-4


def test_greedy_generation_matches(imported):
  import torch
  hf, model, params = imported
  enc = tokens(2, 9, seed=6)
  new = 6
  with torch.no_grad():
    theirs = hf.generate(torch.as_tensor(enc, dtype=torch.long), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, eos_token_id=None).numpy()
  assert (theirs[:, 0] == model.cfg.decoder_start_token_id).all()
  np.testing.assert_array_equal(switch_greedy(model, {"params": params}, enc, new),
                                theirs[:, 1:])


def test_export_loads_in_transformers(imported, tmp_path):
  import transformers
  hf, model, params = imported
  out = export_hf_switch(model.cfg, params, None, tmp_path / "out")
  back = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
  enc, dec = tokens(B, ENC, seed=7), tokens(B, DEC, seed=8)
  ours, _ = _ours(model, {"params": params}, enc, dec)
  theirs = hf.state_dict()
  for name, w in back.state_dict().items():  # every tensor transformers reads comes back exactly
    if name == "shared.weight" and not model.cfg.tie_embeddings:
      continue  # untied, transformers never reads it; the export holds the encoder's embedding
    np.testing.assert_array_equal(w.numpy(), theirs[name].numpy(), err_msg=name)
  assert np.abs(hf_forward(back, enc, dec).logits.numpy() - ours).max() <= 1e-4
  _, again = from_hf_switch(out)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_quantized_student_export_matches_fake_quant(tmp_path, tmp_path_factory):
  """4-bit experts: transformers on the dequantized export computes the fake-quant student."""
  import transformers
  _, model, params = _import_case(1, tmp_path_factory)
  student = model.clone(cfg=model.cfg.replace(quant=QuantRules(expert_code=4)))
  quant = student.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32),
                       jnp.zeros((1, 4), jnp.int32))["quant"]
  assert set(quant["encoder"]) == {f"layers_{i}" for i in student.cfg.encoder_sparse_layers}
  enc, dec = tokens(B, ENC, seed=9), tokens(B, DEC, seed=10)
  teacher_logits, _ = _ours(model, {"params": params}, enc, dec)
  student_logits, _ = _ours(student, {"params": params, "quant": quant}, enc, dec)
  assert np.abs(student_logits - teacher_logits).max() > 1e-3, "4-bit experts changed nothing"
  out = export_hf_switch(student.cfg, params, quant, tmp_path / "student")
  back = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
  assert np.abs(hf_forward(back, enc, dec).logits.numpy() - student_logits).max() <= 1e-4


def test_missing_expert_is_a_one_line_error(tmp_path):
  from safetensors.torch import load_file, save_file
  hf = build_switch_model(**CASES[0])
  hf.save_pretrained(tmp_path)
  tensors = load_file(tmp_path / "model.safetensors")
  gone = "encoder.block.1.layer.1.mlp.experts.expert_3.wi.weight"
  del tensors[gone]
  save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ConvertError, match=f"missing tensor\\(s\\) {gone.replace('.', '[.]')}") as e:
    from_hf_switch(tmp_path)
  assert "\n" not in str(e.value)


def test_sparse_layers_that_do_not_fit_are_a_one_line_error(tmp_path):
  import json
  hf = build_switch_model(**CASES[0])
  hf.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["num_sparse_decoder_layers"] = 3  # 3 of 2 layers: transformers would build none
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConvertError, match="num_sparse_decoder_layers=3 does not fit") as e:
    from_hf_switch(tmp_path)
  assert "\n" not in str(e.value)


def test_decoder_only_import_points_to_the_switch_importer(tmp_path):
  import moeqjax
  build_switch_model(**CASES[0]).save_pretrained(tmp_path)
  with pytest.raises(ConvertError, match="from_hf_switch"):
    moeqjax.from_hf(tmp_path)
