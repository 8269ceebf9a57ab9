"""Optimizers and learning-rate schedules, applied through parameter labels.

`make_optimizer` returns `optax.multi_transform({'trainable': chain, 'frozen': set_to_zero()})`:
frozen parameters get zero updates and no optimizer state (set_to_zero keeps none, and the
trainable chain sees them only as masked nodes). Row masks (partition.layer_masks) zero the
gradient and the update of frozen layers inside stacked arrays.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from lm.errors import ConfigError
from lm.train.partition import FROZEN, TRAINABLE


def make_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  lr, warmup = opt_cfg.lr, min(opt_cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = lr * opt_cfg.end_lr_ratio
  if opt_cfg.schedule == 'cosine':
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=opt_cfg.end_lr_ratio)
  elif opt_cfg.schedule == 'linear':
    after = optax.linear_schedule(lr, end, decay_steps)
  elif opt_cfg.schedule == 'constant':
    after = optax.constant_schedule(lr)
  else:
    raise ConfigError(f'optimizer.schedule={opt_cfg.schedule!r}; choose cosine, linear or constant')
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def decay_mask(param_names, no_decay) -> dict[str, bool]:
  """Weight decay applies to matrices, not to norms, biases or embeddings (by name substring)."""
  return {name: not any(part in name for part in no_decay) for name in param_names}


def _base_optimizer(opt_cfg, schedule, mask):
  name = opt_cfg.name
  if name == 'adamw':
    return optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                       weight_decay=opt_cfg.weight_decay, mask=mask)
  if name == 'lion':
    return optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay,
                      mask=mask)
  if name == 'adafactor':
    return optax.adafactor(schedule, weight_decay_rate=opt_cfg.weight_decay or None,
                           weight_decay_mask=mask)
  if name == 'sgd':
    return optax.sgd(schedule, momentum=opt_cfg.b1 or None)
  raise ConfigError(f'optimizer.name={name!r}; choose adamw, adafactor, lion or sgd')


def zero_rows(masks: dict) -> optax.GradientTransformation:
  """Multiplies `updates[name]` by its per-layer row mask [L] (broadcast over the other dims)."""

  def update(updates, state, params=None):
    del params
    out = {k: (u * jnp.asarray(masks[k], u.dtype).reshape(-1, *([1] * (u.ndim - 1)))
               if k in masks else u) for k, u in updates.items()}
    return out, state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg, labels: dict[str, str], total_steps: int, row_masks=None):
  """(optax transform over the full parameter dict, lr schedule)."""
  schedule = make_schedule(opt_cfg, total_steps)
  mask = decay_mask(labels.keys(), tuple(opt_cfg.no_decay))
  chain = [zero_rows(row_masks)] if row_masks else []
  if opt_cfg.grad_clip:
    chain.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
  chain.append(_base_optimizer(opt_cfg, schedule, mask))
  if row_masks:  # again after the optimizer: weight decay must not move frozen rows either
    chain.append(zero_rows(row_masks))
  tx = optax.multi_transform({TRAINABLE: optax.chain(*chain), FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule
