"""Training objectives. Each maps (model, batch) -> (loss_sum, weight_sum, metric_sums).

Returning sums rather than a mean lets the step normalise once over the whole batch, so k
microbatches give exactly the gradient of one big batch. The step divides both the loss and every
metric sum by the batch's total weight.
"""

from __future__ import annotations


import jax.numpy as jnp
import optax


def next_token_xent(model, batch):
  """Cross-entropy of `targets` under the model, weighted per token by `weights`."""
  logits_BTV = model(batch['tokens'], batch['positions'], batch['segment_ids'])
  xent_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
  weights_BT = batch['weights'].astype(jnp.float32)
  loss_sum = jnp.sum(xent_BT * weights_BT)
  correct = jnp.argmax(logits_BTV, axis=-1) == batch['targets']
  return loss_sum, jnp.sum(weights_BT), {'accuracy': jnp.sum(correct * weights_BT)}


OBJECTIVES = {'next_token_xent': next_token_xent}


def get(name: str):
  from lm.errors import ConfigError  # pylint: disable=import-outside-toplevel
  if name not in OBJECTIVES:
    raise ConfigError(f'train.objective={name!r}; choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]



