"""Training objectives. Each maps (model, batch) -> (loss_sum, weight_sum, metric_sums).

Returning sums rather than a mean lets the step normalise once over the whole batch, so k
microbatches give exactly the gradient of one big batch. The step divides both the loss and every
metric sum by the batch's total weight (tokens for cross-entropy, preference pairs for DPO).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from lm.errors import ConfigError
from lm.train import losses


def token_logprobs(model, tokens_BT, positions_BT, segment_ids_BT, targets_BT, *,
                   adapters=True) -> losses.TokenScores:
  """log p(target) per token (with the log-partition and whether the target is the argmax).

  With `model.loss_chunk_size` > 0 the unembedding and the softmax run over that many positions
  at a time and the [B, T, V] logits never exist (lm/train/losses.py); 0 computes the whole
  logits. Both give the same values and gradients. Every objective that needs token
  log-probabilities should come through here.
  """
  chunk = model.cfg.get('loss_chunk_size', 0)
  head = model.unembedding(adapters=adapters) if chunk else None
  if head is None:
    logits_BTV = model(tokens_BT, positions_BT, segment_ids_BT, adapters=adapters)
    return losses.scores_from_logits(logits_BTV, targets_BT)
  x_BTD, _ = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT, adapters=adapters)
  project, weights, weight_axes = head
  return losses.chunked_token_logprobs(project, weights, x_BTD, targets_BT, chunk,
                                       weight_axes=weight_axes)


def chunked_cross_entropy(model, batch, *, prefix: str = '', adapters=True):
  """Cross-entropy per token [B, T] of `<prefix>targets` (unweighted), through token_logprobs."""
  scores = token_logprobs(model, batch[prefix + 'tokens'], batch[prefix + 'positions'],
                          batch[prefix + 'segment_ids'], batch[prefix + 'targets'],
                          adapters=adapters)
  return -scores.logp


def next_token_xent(model, batch):
  """Cross-entropy of `targets` under the model, weighted per token by `weights`."""
  scores = token_logprobs(model, batch['tokens'], batch['positions'], batch['segment_ids'],
                          batch['targets'])
  weights_BT = batch['weights'].astype(jnp.float32)
  loss_sum = -jnp.sum(scores.logp * weights_BT)
  return loss_sum, jnp.sum(weights_BT), {'accuracy': jnp.sum(scores.correct * weights_BT)}


def segment_log_probs(model, batch, prefix: str, *, adapters=True):
  """(sum of log p(target) over each segment's weighted tokens [B, T+1], weight per segment).

  Index s of the last axis is segment id s (0: padding), so packed rows holding several
  sequences give one log-probability per sequence.
  """
  tokens = batch[prefix + 'tokens']
  logp_BT = token_logprobs(model, tokens, batch[prefix + 'positions'],
                           batch[prefix + 'segment_ids'], batch[prefix + 'targets'],
                           adapters=adapters).logp
  weights_BT = batch[prefix + 'weights'].astype(jnp.float32)
  segments = tokens.shape[1] + 1
  per_segment = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=segments))
  seg_BT = batch[prefix + 'segment_ids']
  return per_segment(logp_BT * weights_BT, seg_BT), per_segment(weights_BT, seg_BT)


def reference_policy(model):
  """(module, adapters) of the frozen reference policy: the state's `ref.*` copy if it carries
  one, else the same model with its LoRA adapters switched off (no second copy of the weights)."""
  if model.reference is not None:
    return model.reference, True
  if model.cfg.lora.rank:
    return model, False
  raise ConfigError('DPO needs a reference policy: train LoRA adapters (model.lora.rank > 0) or '
                    'let the Trainer carry a frozen copy (train.objective=dpo does)')


def reference_of(model):
  """The frozen reference policy as a logits function (see reference_policy)."""
  module, adapters = reference_policy(model)
  return functools.partial(module, adapters=adapters)


def dpo(model, batch, *, beta: float = 0.1, label_smoothing: float = 0.0):
  """Direct Preference Optimization (Rafailov et al. 2023) over chosen_* / rejected_* rows.

  Pair j of row i is segment j of both `chosen_*` and `rejected_*` row i; a pair counts where
  both replies have weighted (trained) tokens. Loss per pair: -log sigmoid(beta * margin), with
  margin = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected));
  label_smoothing > 0 gives conservative DPO.
  """
  reference, ref_adapters = reference_policy(model)
  logp, n = {}, {}
  for side in ('chosen', 'rejected'):
    policy, n[side] = segment_log_probs(model, batch, side + '_')
    ref, _ = segment_log_probs(reference, batch, side + '_', adapters=ref_adapters)
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


OBJECTIVES = {'next_token_xent': next_token_xent, 'dpo': dpo}
NEEDS_REFERENCE = {'dpo'}


def get(name: str):
  if name not in OBJECTIVES:
    raise ConfigError(f'train.objective={name!r}; choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def from_config(cfg):
  """The objective `train.objective` names, with its settings bound."""
  name = cfg.train.objective
  if name == 'dpo':
    return functools.partial(dpo, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)
  return get(name)
