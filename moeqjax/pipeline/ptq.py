"""`moeqjax ptq`: post-training quantization (RTN or per-expert GPTQ) of a teacher into a student workdir."""

# A ptq workdir is read like a finished QAT workdir (eval, pack, export, generate): the same
# config.json sections plus a `ptq` section, and one checkpoint at step qat.steps whose params are
# the quantized student. The fake quantizer re-derives its grid from those params, so GPTQ's result
# is stored as gptq.exact_latent (weights whose round-to-nearest quantization is GPTQ's) with
# gptq.exact_ratio in the experts' `*_clip` params (a GPTQ run records quant.stored_ratio=True),
# and the integer codes, scales and zero points that pack/export write are GPTQ's, exactly. Only routed
# experts are GPTQ'd; attention, shared experts, router and lm_head keep their configured codes
# (round-to-nearest by the fake quantizer, as in QAT).

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from moeqjax.data import TokenCorpus
from moeqjax.model import default_quant, init_ratios, set_expert_codes
from moeqjax.model.codes import expert_codes
from moeqjax.model.moe_paths import at_path
from moeqjax.model.projection_codes import layer_codes
from moeqjax.pipeline import config as config_io
from moeqjax.pipeline import import_hf
from moeqjax.pipeline.ptq_calib import expert_blocks, expert_hessians
from moeqjax.pipeline.workdirs import (CONFIG_RECORD, finished_state, record_config, state_template,
                                      teacher_inputs)
from moeqjax.quant import QuantSpec, quantize_dequantize
from moeqjax.quant import gptq as gq
from moeqjax.train import Checkpointer, create_state, make_optimizer

METHODS = ("rtn", "gptq")
REPORT = "ptq_report.json"
# The expert matrices by the input they read; a block GPTQs those its params hold (ReLU experts,
# e.g. Switch's, have no w_gate).
_MATRICES = (("in", ("w_in", "w_gate")), ("out", ("w_out",)))


class PtqError(config_io.ConfigError):
  """Bad input to `moeqjax ptq` (printed as one line)."""


def _warn(text: str):
  print(f"moeqjax: warning: {text}", file=sys.stderr)


def _check(config, corpus: TokenCorpus | None, method: str, calib_batches: int):
  """One-line errors before any work; corpus None: the calibration data are not corpus windows
  (a Switch config's seq2seq.pairs), so there is no window length to check."""
  if method not in METHODS:
    raise PtqError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
  if calib_batches < 1:
    raise PtqError(f"--calib-batches {calib_batches} must be at least 1 (e.g. 8)")
  if config.quant.learn_clip or config.quant.get("learn_scale", False):
    raise PtqError("ptq trains nothing, so it has no learned clip ratios or scales; drop "
                   "--config.quant.learn_clip=True / --config.quant.learn_scale=True")
  need = config.qat.seq_len + 1
  if method == "gptq" and corpus is not None and len(corpus.train) < need:
    raise PtqError(f"no calibration data: the train split has {len(corpus.train)} tokens, fewer "
                   f"than one window of {need}; give --data with more text or lower "
                   "--config.qat.seq_len")


def _output_error(w, w_q, h) -> float:
  """sum over experts of tr((W - W_q)^T H (W - W_q)): the calibration output error (up to 2/n)."""
  delta = np.asarray(w, np.float64) - np.asarray(w_q, np.float64)
  return float(np.einsum("eio,eij,ejo->", delta, h, delta))


def _with_node(tree, path: tuple[str, ...], node):
  """`tree` with the node at `path` replaced: new dicts along the path, every other entry shared."""
  if not path:
    return node
  return {**tree, path[0]: _with_node(tree[path[0]], path[1:], node)}


def gptq_experts(cfg, params, hessians, codes_LxE: np.ndarray, *, block_size=gq.DEFAULT_BLOCK,
                 damp=gq.DEFAULT_DAMP, progress: bool = False):
  """GPTQ of every MoE block's routed experts at their codes; returns (new params, report dict).

  The blocks are the params' dicts holding a "w_in" (ptq_calib.expert_blocks: model.moe_paths
  order, the rows of `codes_LxE` and of `hessians`), so a decoder-only model's layers_i/moe and a
  Switch Transformer's encoder/decoder sparse blocks go through the same loop; each block's
  matrices are those of _MATRICES it holds (w_in, w_out and, for SwiGLU experts, w_gate).
  Experts that got no calibration tokens are quantized with H = I, which is round-to-nearest (on
  GPTQ's grid). `cfg` (a ModelConfig or SwitchConfig) gives quant and param_dtype;
  `cfg.quant.stored_ratio` must be True: each expert weight's `*_clip` param gets GPTQ's ratios.
  `progress` draws a bar over the blocks.
  """
  spec: QuantSpec = cfg.quant.spec()
  if not spec.stored_ratio:
    raise ValueError("gptq_experts needs quant.stored_ratio=True: GPTQ's scale ratios are stored in "
                     "the experts' *_clip params (ptq sets it; pass a config with it)")
  if jnp.dtype(cfg.param_dtype) != jnp.float32:
    _warn(f"model.param_dtype is {cfg.param_dtype}: GPTQ's experts are stored rounded to it, so the "
          "student equals GPTQ's result only up to that rounding; use "
          "--config.model.param_dtype=float32 for the exact result")
  paths = expert_blocks(params)
  if len(paths) != len(hessians.tokens) or len(paths) != len(codes_LxE):
    raise ValueError(f"the params hold {len(paths)} MoE blocks but the Hessians "
                     f"{len(hessians.tokens)} and the codes {len(codes_LxE)} rows")
  no_tokens, damped, errors = [], [], {"gptq": 0.0, "rtn": 0.0}
  searched = []  # per matrix: the fraction of columns that kept the MSE grid
  for layer, path in enumerate(tqdm(paths, desc="gptq layers", disable=not progress,
                                    dynamic_ncols=True)):
    counts = hessians.tokens[layer]
    empty = counts == 0
    no_tokens += [[layer, int(e)] for e in np.flatnonzero(empty)]
    moe = dict(at_path(params, path))
    for which, all_names in _MATRICES:
      names = tuple(n for n in all_names if n in moe)
      if not names:
        continue
      h = hessians.h_in[layer] if which == "in" else hessians.h_out[layer]
      h = np.where(empty[:, None, None], np.eye(h.shape[-1]), h)
      u, dead, used = gq.inverse_hessian_factor(h, damp)  # once per input, shared by its matrices
      damped += [[layer, int(e), "/".join(names), float(used[e])]
                 for e in np.flatnonzero(used != damp)]
      for name in names:
        codes = jnp.asarray(layer_codes(np.asarray(codes_LxE[layer]), name), jnp.int32)
        w = moe[name]
        res = gq.gptq(w, u, codes, spec, dead=dead, h=h, block_size=block_size)
        errors["gptq"] += _output_error(w, res.w_hat, h)
        errors["rtn"] += _output_error(w, quantize_dequantize(w, codes, spec), h)
        searched.append(float(np.mean(np.asarray(res.searched))))
        moe[name] = gq.exact_latent(res, codes, spec).astype(w.dtype)
        moe[name + "_clip"] = gq.exact_ratio(res, np.asarray(codes), spec).astype(w.dtype)
    params = _with_node(params, path, moe)
  if no_tokens:
    _warn(f"{len(no_tokens)} experts got no calibration tokens and were rounded to nearest "
          f"(layer, expert): {', '.join(f'({l}, {e})' for l, e in no_tokens)}; raise --calib-batches")
  if damped:
    _warn("GPTQ Hessians needed more damping (layer, expert, matrix: lambda): "
          + ", ".join(f"({l}, {e}, {n}: {lam:g})" for l, e, n, lam in damped)
          + f" instead of {damp:g}; inf means none sufficed and the expert was rounded to nearest")
  report = {"rtn_fallback_no_tokens": no_tokens, "extra_damping": damped,
            "calib_output_error": errors, "scale_init": spec.scale_init,
            "mse_grid_columns": float(np.mean(searched)) if searched else 0.0}
  return params, report


def gptq_student(cfg, params, hessians, codes_LxE: np.ndarray, report: dict):
  """gptq_experts with a progress bar; adds its findings and the calibration token counts to
  `report` (the ptq report) and returns the new params. Shared by both model families."""
  params, found = gptq_experts(cfg, params, hessians, codes_LxE, progress=True)
  report.update(found, calib_tokens_per_expert=hessians.tokens.tolist())
  return params


def ptq_record(method: str, calib_batches: int) -> dict:
  """config.json's ptq section."""
  return {"method": method, "calib_batches": calib_batches if method == "gptq" else 0,
          "damp": gq.DEFAULT_DAMP, "block_size": gq.DEFAULT_BLOCK}


def gptq_config(config, method: str):
  """The config a ptq run records and uses: GPTQ's scale ratios live in the experts' *_clip
  params, so a gptq run sets quant.stored_ratio=True (on a copy)."""
  if method != "gptq":
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.quant.stored_ratio = True
  return config


def ptq(config, workdir: str | pathlib.Path, corpus: TokenCorpus, teacher, *, method: str,
        expert_codes_LxE: np.ndarray | None = None, calib_batches: int = 8,
        provenance: dict | None = None):
  """Post-training quantization of `teacher` params into a workdir that reads as a finished QAT run.

  Args:
    config: the experiment ConfigDict (model, quant, data, qat, loss sections; qat.batch_size,
      qat.seq_len and qat.seed shape the calibration batches).
    workdir: output folder (config.json, ckpt/, ptq_report.json).
    corpus: the data; calibration windows come from corpus.train.
    teacher: the full-precision params (routing and calibration inputs come from them).
    method: "rtn" (the fake quantizer's round-to-nearest) or "gptq" (routed experts by GPTQ).
    expert_codes_LxE: per-layer, per-expert codes; None uses quant.expert_code everywhere.
    calib_batches: calibration batches of qat.batch_size x qat.seq_len tokens (gptq).
    provenance: recorded in config.json but not compared on resume (e.g. {"teacher": path}).

  Returns:
    (state, report): the saved student state (step = qat.steps) and the ptq report.
  """
  _check(config, corpus, method, calib_batches)
  config = gptq_config(config, method)
  workdir = pathlib.Path(workdir)
  cfg = config_io.model_config(config)
  loop, optim = config_io.phase_configs(config.qat, "qat")
  quant = default_quant(cfg)
  if expert_codes_LxE is not None:
    quant = set_expert_codes(quant, expert_codes_LxE)
  codes = expert_codes(quant, cfg.num_layers)
  record = {k: config[k].to_dict() for k in ("model", "quant", "data", "qat", "loss")}
  record["expert_codes"] = None if expert_codes_LxE is None else codes.tolist()
  record["ptq"] = ptq_record(method, calib_batches)
  record_config(workdir, record, provenance)
  build = student_builder(make_optimizer(optim), cfg.num_layers, quant, teacher, loop.steps)
  # Ratio params (stored_ratio) where the rules carry them: 1 or MSE-searched, GPTQ's replace them.
  params = init_ratios(cfg, teacher, quant)
  done = finished_ptq(workdir, build, params, loop.steps)
  if done is not None:
    return done
  report = {"method": method, "expert_codes": codes.tolist()}
  if method == "gptq":
    hessians = expert_hessians(cfg, teacher, corpus.train, batches=calib_batches,
                               batch_size=loop.batch_size, seq_len=loop.seq_len, seed=loop.seed,
                               progress=True)
    params = gptq_student(cfg, params, hessians, codes, report)
  return save_ptq(workdir, build(jax.tree.map(jnp.copy, params)), report)


def student_builder(tx, num_layers, quant, teacher, steps: int):
  """params -> the train state a ptq workdir saves: the student at `quant`, the teacher beside it
  (a copy: the state is donated) and step = `steps`, so that it reads like a finished QAT run."""

  def build(params):
    state = create_state(params, tx, num_layers, quant=quant,
                         teacher_params=jax.tree.map(jnp.copy, teacher))
    return state.replace(step=jnp.asarray(steps, jnp.int32))

  return build


def finished_ptq(workdir: pathlib.Path, build, params, steps: int):
  """(state, report) of a ptq that already finished in `workdir`, else None."""
  done = finished_state(workdir, jax.eval_shape(build, params), steps)
  report_path = workdir / REPORT
  if done is None or not report_path.is_file():
    return None
  return done, json.loads(report_path.read_text())


def save_ptq(workdir: pathlib.Path, state, report: dict):
  """Saves the ptq student's state as workdir/ckpt and its report; returns (state, report)."""
  ckpt = Checkpointer(workdir / "ckpt", every=0)
  try:
    ckpt.save(state, force=True)
  finally:
    ckpt.close()
  (workdir / REPORT).write_text(json.dumps(report, indent=2) + "\n")
  return state, report


def ptq_from_teacher(config, workdir: pathlib.Path, teacher_dir: pathlib.Path, method: str,
                     allocation_path: str | None, calib_batches: int):
  """`moeqjax ptq`: the teacher's params, the data and an optional allocation.json (a Switch
  config: switch_phases.ptq_from_teacher)."""
  if config_io.is_switch(config):
    from moeqjax.pipeline import switch_phases
    return switch_phases.ptq_from_teacher(config, workdir, teacher_dir, method, allocation_path,
                                          calib_batches)
  params, corpus, codes = teacher_inputs(config, teacher_dir, allocation_path)
  result = ptq(config, workdir, corpus, params, method=method, expert_codes_LxE=codes,
               calib_batches=calib_batches,
               provenance={"teacher": str(pathlib.Path(teacher_dir).absolute())})
  import_hf.keep_hf_config(teacher_dir, workdir)
  return result


def init_from_student(config, init_from, codes):
  """(qat's init_from, codes) for `qat --init-from PTQ_DIR`: (its absolute path, its student's
  params) and the PTQ student's codes unless an allocation already gave `codes`; (None, codes)
  without --init-from. Either model family."""
  if init_from is None:
    return None, codes
  params, ptq_codes = ptq_student(config, pathlib.Path(init_from))
  return (str(pathlib.Path(init_from).absolute()), params), (ptq_codes if codes is None else codes)


def ptq_student(config, ptq_dir: pathlib.Path):
  """(params, codes [L, E]) of a finished `moeqjax ptq` workdir made with this model and quant config
  (either model family: a Switch run's rows are its sparse layers, encoder first).

  Raises:
    PtqError: not a ptq workdir, another model or quant config, or no finished checkpoint.
  """
  record_path = ptq_dir / CONFIG_RECORD
  record = json.loads(record_path.read_text()) if record_path.is_file() else {}
  if "ptq" not in record:
    raise PtqError(f"--init-from {ptq_dir} is not a `moeqjax ptq` workdir (no ptq section in its "
                   f"{CONFIG_RECORD}); make one with `moeqjax ptq --workdir {ptq_dir} ...`")
  for section in ("model", "quant"):
    if record[section] != config[section].to_dict():
      raise PtqError(f"--init-from {ptq_dir} was made with another {section} config; rerun "
                     f"`moeqjax ptq` with this one or pass its --config.{section}.* values")
  made = ml_collections.ConfigDict({k: record[k] for k in ("model", "quant", "qat")})
  state = finished_state(ptq_dir, state_template(made, "qat", record.get("expert_codes")),
                         made.qat.steps,
                         parts=("params", "quant"))
  if state is None:
    raise PtqError(f"--init-from {ptq_dir} has no finished checkpoint; rerun `moeqjax ptq` into it")
  num_layers = None if config_io.is_switch(config) else config_io.model_config(config).num_layers
  return state.params, expert_codes(state.quant, num_layers)
