"""Aux-loss-free load balancing (DeepSeek-V3): the sigmoid router's per-expert correction bias
steers the top-k choice towards experts that took less than their share, and is moved by the
step's measured expert load, not by the gradient (the choice has none).

It is a state update inside the one train step: the objective logs each MoE layer's expert load
(`EXPERT_LOAD`, [n_moe_layers, E], token-weighted over the step's microbatches like every other
metric), and the step hands its parameters and metrics to `update`, which moves
`layers.moe.correction_bias` by `model.moe.bias_update_rate` · sign(mean load - load) (lm/model/
routers.py: bias_update) and takes the load out of the logged metrics. A step the guard skips
leaves the bias as it was. The bias is a parameter, so checkpoints carry it and a resumed run
continues it exactly; every trainable partition leaves it out of the gradient
(lm/train/partition.py: NOT_TRAINED). Without the sigmoid router or with a rate of 0 the update
is the identity.
"""

from __future__ import annotations

import jax.numpy as jnp

from lm.config import n_experts
from lm.model import routers

EXPERT_LOAD = 'moe_expert_load'
BIAS = 'layers.moe.correction_bias'


def active(m) -> bool:
  """Whether model config `m` balances by the correction bias."""
  return bool(n_experts(m) and m.moe.get('router') == 'sigmoid' and m.moe.get('bias_update_rate'))


def keep(params, metrics, ok):
  del ok
  return params, metrics


def from_config(m):
  """update(params, metrics, ok) -> (params, metrics) for the train step (`keep` when off)."""
  if not active(m):
    return keep
  rate = float(m.moe.bias_update_rate)

  def update(params, metrics, ok):
    metrics = dict(metrics)
    if EXPERT_LOAD not in metrics:  # at trace time, before any step runs
      raise ValueError(f'model.moe.bias_update_rate > 0 needs the objective to log {EXPERT_LOAD}; '
                       'build it with lm.train.objectives.from_config(cfg)')
    load_LE = metrics.pop(EXPERT_LOAD)
    moved = routers.bias_update(params[BIAS], load_LE, rate)
    # Logged: how far the busiest expert is above its layer's mean load (1: balanced).
    metrics['moe_max_load'] = jnp.max(load_LE / jnp.mean(load_LE, axis=-1, keepdims=True))
    return {**params, BIAS: jnp.where(ok, moved, params[BIAS])}, metrics

  return update
