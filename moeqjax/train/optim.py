"""AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import dataclasses

import jax
import optax

from moeqjax.quant import clip


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer hyper-parameters of one training phase."""

  learning_rate: float  # peak learning rate after warmup
  warmup_steps: int
  total_steps: int  # cosine decays over this many steps
  end_lr_fraction: float  # final lr = learning_rate * end_lr_fraction
  weight_decay: float  # decoupled, on matrices only (norm scales, biases, clip ratios are not)
  grad_clip: float  # global-norm clip
  b1: float = 0.9
  b2: float = 0.95

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
    if self.total_steps < 1:
      raise ValueError(f"steps={self.total_steps} must be >= 1")
    if not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, steps={self.total_steps}]")


def lr_schedule(cfg: OptimConfig) -> optax.Schedule:
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
      end_value=cfg.learning_rate * cfg.end_lr_fraction)


def decay_mask(params):
  """True for the params that weight decay applies to: matrices, but not learned clip ratios.

  Clip ratios ([E, 1, F]) are scales folded into the quantizer, not weights; decay would pull them
  towards 0 (maximal clipping) independently of the loss.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and not _is_clip(path), params)


def project_params(params, upper: float = clip.CLIP_MAX):
  """Projects learned ratios back into [CLIP_MIN, upper] after an update; other params unchanged.

  `upper` is clip.ratio_max(spec): 1 for clip ratios, clip.SCALE_MAX for learned scales.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: clip.project_clip_ratio(p, upper) if _is_clip(path) else p, params)


def apply_gradients(params, grads, opt_state, tx: optax.GradientTransformation, spec):
  """(params, opt_state) after one optimizer update, learned ratios projected into range.

  Projection, not a clamp in the forward pass: a clip ratio on its bound keeps its gradient.
  """
  updates, opt_state = tx.update(grads, opt_state, params)
  return project_params(optax.apply_updates(params, updates), clip.ratio_max(spec)), opt_state


def _is_clip(path) -> bool:
  last = path[-1] if path else None
  return isinstance(last, jax.tree_util.DictKey) and clip.is_clip_param(str(last.key))


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """AdamW (decay on `decay_mask`) after global-norm clipping; follow it with project_params."""
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(lr_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
  )
