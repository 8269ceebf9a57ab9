"""Training objectives. Each maps (model, batch) -> (loss_sum, weight_sum, metric_sums).

Returning sums rather than a mean lets the step normalise once over the whole batch, so k
microbatches give exactly the gradient of one big batch. The step divides both the loss and every
metric sum by the batch's total weight (tokens for cross-entropy, preference pairs for DPO).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lm.errors import ConfigError


def next_token_xent(model, batch):
  """Cross-entropy of `targets` under the model, weighted per token by `weights`."""
  logits_BTV = model(batch['tokens'], batch['positions'], batch['segment_ids'])
  xent_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch['targets'])
  weights_BT = batch['weights'].astype(jnp.float32)
  loss_sum = jnp.sum(xent_BT * weights_BT)
  # "The target has the highest logit", without argmax: XLA's CPU variadic (value, index)
  # reduce over the vocabulary costs ~5% of a small model's step; a max is nearly free.
  target_BT = jnp.take_along_axis(logits_BTV, batch['targets'][..., None], axis=-1)[..., 0]
  correct = target_BT >= jnp.max(logits_BTV, axis=-1)
  return loss_sum, jnp.sum(weights_BT), {'accuracy': jnp.sum(correct * weights_BT)}


def segment_log_probs(model_fn, batch, prefix: str):
  """(sum of log p(target) over each segment's weighted tokens [B, T+1], weight per segment).

  Index s of the last axis is segment id s (0: padding), so packed rows holding several
  sequences give one log-probability per sequence.
  """
  tokens = batch[prefix + 'tokens']
  logits_BTV = model_fn(tokens, batch[prefix + 'positions'], batch[prefix + 'segment_ids'])
  logp_BT = -optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch[prefix + 'targets'])
  weights_BT = batch[prefix + 'weights'].astype(jnp.float32)
  segments = tokens.shape[1] + 1
  per_segment = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=segments))
  seg_BT = batch[prefix + 'segment_ids']
  return per_segment(logp_BT * weights_BT, seg_BT), per_segment(weights_BT, seg_BT)


def reference_of(model):
  """The frozen reference policy: the state's `ref.*` copy if it carries one, else the same
  model with its LoRA adapters switched off (no second copy of the weights)."""
  if model.reference is not None:
    return model.reference
  if model.cfg.lora.rank:
    return functools.partial(model, adapters=False)
  raise ConfigError('DPO needs a reference policy: train LoRA adapters (model.lora.rank > 0) or '
                    'let the Trainer carry a frozen copy (train.objective=dpo does)')


def dpo(model, batch, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """Direct Preference Optimization (Rafailov et al. 2023) over chosen_* / rejected_* rows.

  Pair j of row i is segment j of both `chosen_*` and `rejected_*` row i; a pair counts where
  both replies have weighted (trained) tokens. Loss per pair: -log sigmoid(beta * margin), with
  margin = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected));
  label_smoothing > 0 gives conservative DPO.
  """
  reference = reference_of(model)
  logp, n = {}, {}
  for side in ('chosen', 'rejected'):
    policy, n[side] = segment_log_probs(model, batch, side + '_')
    ref, _ = segment_log_probs(reference, batch, side + '_')
    logp[side] = (policy, jax.lax.stop_gradient(ref))
  valid = ((n['chosen'] > 0) & (n['rejected'] > 0)).astype(jnp.float32)
  chosen_reward = beta * (logp['chosen'][0] - logp['chosen'][1])
  rejected_reward = beta * (logp['rejected'][0] - logp['rejected'][1])
  margin = chosen_reward - rejected_reward
  loss = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(margin)
          - label_smoothing * jax.nn.log_sigmoid(-margin))
  total = lambda x: jnp.sum(x * valid)
  return total(loss), jnp.sum(valid), {
      'reward_accuracy': total(margin > 0), 'reward_margin': total(margin),
      'chosen_reward': total(chosen_reward), 'rejected_reward': total(rejected_reward),
      'chosen_logp': total(logp['chosen'][0])}


def with_router_losses(objective, *, aux_loss_weight: float, z_loss_weight: float):
  """`objective` plus the Mixture-of-Experts router losses (lm/model/moe.py) the model recorded
  while the objective ran: aux_loss_weight * load balancing + z_loss_weight * router z-loss.

  Both are means (over tokens and layers), so each enters the sum scaled by the batch's weight:
  after the step's division the loss is objective + weighted router losses, as HF adds
  router_aux_loss_coef * aux_loss. Logged, unweighted, as moe_load_balancing and moe_router_z.
  """

  def objective_with_router_losses(model, batch):
    model.router_losses, model.router_calls = None, 0
    loss_sum, weight_sum, metrics = objective(model, batch)
    if not model.router_calls:
      return loss_sum, weight_sum, metrics
    mean = {k: v / model.router_calls for k, v in model.router_losses.items()}
    router = aux_loss_weight * mean['load_balancing'] + z_loss_weight * mean['router_z']
    return loss_sum + router * weight_sum, weight_sum, {
        **metrics, 'moe_load_balancing': mean['load_balancing'] * weight_sum,
        'moe_router_z': mean['router_z'] * weight_sum}

  objective_with_router_losses.without_router_losses = objective
  return objective_with_router_losses


def for_evaluation(objective):
  """The objective held-out loss is measured with: without router losses (not a model's fit)."""
  return getattr(objective, 'without_router_losses', objective)


OBJECTIVES = {'next_token_xent': next_token_xent, 'dpo': dpo}
NEEDS_REFERENCE = {'dpo'}


def get(name: str):
  if name not in OBJECTIVES:
    raise ConfigError(f'train.objective={name!r}; choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def from_config(cfg):
  """The objective `train.objective` names, with its settings bound (and the router losses of a
  Mixture-of-Experts model)."""
  name = cfg.train.objective
  if name == 'dpo':
    objective = functools.partial(dpo, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)
  else:
    objective = get(name)
  moe = cfg.model.moe
  if moe.n_experts and (moe.aux_loss_weight or moe.z_loss_weight):
    objective = with_router_losses(objective, aux_loss_weight=moe.aux_loss_weight,
                                   z_loss_weight=moe.z_loss_weight)
  return objective
