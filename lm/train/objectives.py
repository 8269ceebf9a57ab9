"""Training objectives. Each maps (model, batch) -> (loss_sum, weight_sum, metric_sums).

Returning sums rather than a mean lets the step normalise once over the whole batch, so k
microbatches give exactly the gradient of one big batch. The step divides both the loss and every
metric sum by the batch's total weight (tokens for cross-entropy, preference pairs for DPO).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lm.errors import ConfigError
from lm.train import balancing, losses


class Policy(NamedTuple):
  """A model run with its LoRA adapters on or off: the trained policy, or the frozen reference
  of a LoRA run (the same weights, adapters off). Called, it gives the logits, as the model does."""
  module: Any
  adapters: bool = True

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None):
    return self.module(tokens_BT, positions_BT, segment_ids_BT, adapters=self.adapters)


def _policy(model) -> Policy:
  return model if isinstance(model, Policy) else Policy(model)


def token_logprobs(model, tokens_BT, positions_BT, segment_ids_BT, targets_BT, *,
                   adapters=True) -> losses.TokenScores:
  """log p(target) per token (with the log-partition and whether the target is the argmax).

  With `model.loss_chunk_size` > 0 the unembedding and the softmax run over that many positions
  at a time and the [B, T, V] logits never exist (lm/train/losses.py); 0 computes the whole
  logits. Both give the same values and gradients. Every objective that needs token
  log-probabilities comes through here (via token_log_probs).
  """
  # getattr: a model config saved before the key existed; a test's logits function has none.
  chunk = getattr(model.cfg, 'loss_chunk_size', 0)
  # A sequence that fits in one chunk takes the plain path: chunking could save nothing (the one
  # chunk's logits are the whole logits), and its backward would recompute them (20% of a small
  # model's CPU step, measured with lm.bench.alternate on configs/bench_tiny.py).
  head = model.unembedding(adapters=adapters) if 0 < chunk < tokens_BT.shape[1] else None
  if head is None:
    # `adapters` is passed only to switch them off, so any logits function serves as a model.
    off = {} if adapters else {'adapters': False}
    logits_BTV = model(tokens_BT, positions_BT, segment_ids_BT, **off)
    return losses.scores_from_logits(logits_BTV, targets_BT)
  x_BTD, _ = model.hidden_states(tokens_BT, positions_BT, segment_ids_BT, adapters=adapters)
  project, weights, weight_axes = head
  return losses.chunked_token_logprobs(project, weights, x_BTD, targets_BT, chunk,
                                       weight_axes=weight_axes)


def token_log_probs(model, batch, prefix: str = ''):
  """log p(target) of every position [B, T] of `<prefix>targets` under `model` (a model, or a
  Policy such as reference_of(model)).

  Every objective that needs per-token log-probabilities (next-token, the DPO family, KTO, GRPO)
  gets them here, through token_logprobs, so they all take the chunked loss when
  model.loss_chunk_size > 0.
  """
  policy = _policy(model)
  return token_logprobs(policy.module, batch[prefix + 'tokens'], batch[prefix + 'positions'],
                        batch[prefix + 'segment_ids'], batch[prefix + 'targets'],
                        adapters=policy.adapters).logp


def chunked_cross_entropy(model, batch, *, prefix: str = ''):
  """Cross-entropy per token [B, T] of `<prefix>targets` (unweighted), through token_log_probs."""
  return -token_log_probs(model, batch, prefix)


def next_token_xent(model, batch):
  """Cross-entropy of `targets` under the model, weighted per token by `weights`."""
  scores = token_logprobs(model, batch['tokens'], batch['positions'], batch['segment_ids'],
                          batch['targets'])
  weights_BT = batch['weights'].astype(jnp.float32)
  loss_sum = -jnp.sum(scores.logp * weights_BT)
  return loss_sum, jnp.sum(weights_BT), {'accuracy': jnp.sum(scores.correct * weights_BT)}


def segment_log_probs(model, batch, prefix: str):
  """(sum of log p(target) over each segment's weighted tokens [B, T+1], weight per segment).

  Index s of the last axis is segment id s (0: padding), so packed rows holding several
  sequences give one log-probability per sequence. `model` may be a Policy (reference_of).
  """
  tokens = batch[prefix + 'tokens']
  logp_BT = token_log_probs(model, batch, prefix)
  weights_BT = batch[prefix + 'weights'].astype(jnp.float32)
  segments = tokens.shape[1] + 1
  per_segment = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=segments))
  seg_BT = batch[prefix + 'segment_ids']
  return per_segment(logp_BT * weights_BT, seg_BT), per_segment(weights_BT, seg_BT)


def reference_of(model) -> Policy:
  """The frozen reference policy: the state's `ref.*` copy if it carries one, else the same
  model with its LoRA adapters switched off (no second copy of the weights)."""
  if model.reference is not None:
    return Policy(model.reference)
  if model.cfg.lora.rank:
    return Policy(model, adapters=False)
  raise ConfigError('this objective needs a reference policy: train LoRA adapters '
                    '(model.lora.rank > 0) or let the Trainer carry a frozen copy (train.objective='
                    'dpo, ipo or kto does)')


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


def _pair_log_probs(model, batch, *, reference: bool):
  """Per pair (segment) of chosen_* / rejected_* rows: {side: (policy sum log p, reference sum
  log p or None, trained tokens)} and the mask of pairs where both replies have trained tokens."""
  ref_fn = reference_of(model) if reference else None
  out = {}
  for side in ('chosen', 'rejected'):
    policy, n = segment_log_probs(model, batch, side + '_')
    ref = jax.lax.stop_gradient(segment_log_probs(ref_fn, batch, side + '_')[0]) if reference else None
    out[side] = (policy, ref, n)
  valid = ((out['chosen'][2] > 0) & (out['rejected'][2] > 0)).astype(jnp.float32)
  return out, valid


def _pair_sums(loss, margin, valid, **more):
  """(loss sum, pairs, metric sums) with the preference metrics every pair objective reports."""
  total = lambda x: jnp.sum(x * valid)
  return total(loss), jnp.sum(valid), {
      'reward_accuracy': total(margin > 0), 'reward_margin': total(margin),
      **{k: total(v) for k, v in more.items()}}


def ipo(model, batch, *, beta: float = 0.1):
  """Identity Preference Optimisation (Azar et al. 2023): (h - 1 / (2 beta))^2 per pair, with
  h = (mean log pi(chosen) - mean log ref(chosen)) - (the same for rejected). Like TRL, the
  log-probabilities are averaged over each reply's tokens, so long replies do not dominate h."""
  lp, valid = _pair_log_probs(model, batch, reference=True)
  ratio = {side: (p - r) / jnp.maximum(n, 1.0) for side, (p, r, n) in lp.items()}
  margin = ratio['chosen'] - ratio['rejected']
  return _pair_sums((margin - 1.0 / (2.0 * beta)) ** 2, margin, valid,
                    chosen_reward=ratio['chosen'], rejected_reward=ratio['rejected'])


def simpo(model, batch, *, beta: float = 2.0, gamma: float = 1.0):
  """SimPO (Meng et al. 2024), reference-free: the reward of a reply is beta times its mean
  token log-probability; loss -log sigmoid(reward(chosen) - reward(rejected) - gamma)."""
  lp, valid = _pair_log_probs(model, batch, reference=False)
  reward = {side: beta * p / jnp.maximum(n, 1.0) for side, (p, _, n) in lp.items()}
  margin = reward['chosen'] - reward['rejected']
  return _pair_sums(-jax.nn.log_sigmoid(margin - gamma), margin, valid,
                    chosen_reward=reward['chosen'], rejected_reward=reward['rejected'])


def log1mexp(x):
  """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012): near 0, where 1 - exp(x)
  loses every digit to rounding (a near-certain reply in ORPO), log(-expm1(x)); below -log 2,
  log1p(-exp(x)). Both branches are finite for x < 0, so the unused one's gradient is harmless."""
  return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo(model, batch, *, weight: float = 0.1):
  """ORPO (Hong et al. 2024), reference-free: the chosen reply's mean token NLL plus `weight`
  times -log sigmoid(log odds(chosen) - log odds(rejected)), odds(y) = p / (1 - p) with p the
  mean-token probability exp(mean log p(y)). Both terms are per pair (the SFT term is a per-reply
  mean, not TRL's mean over all chosen tokens of the batch)."""
  lp, valid = _pair_log_probs(model, batch, reference=False)
  mean = {side: p / jnp.maximum(n, 1.0) for side, (p, _, n) in lp.items()}
  # log(p / (1 - p)) = mean - log(1 - exp(mean)), with log(1 - exp(x)) taken stably (log1mexp).
  log_odds = {side: m - log1mexp(jnp.minimum(m, -1e-6)) for side, m in mean.items()}
  margin = log_odds['chosen'] - log_odds['rejected']
  odds_loss = -jax.nn.log_sigmoid(margin)
  return _pair_sums(-mean['chosen'] + weight * odds_loss, margin, valid,
                    sft_loss=-mean['chosen'], odds_ratio_loss=odds_loss)


def kto(model, batch, *, beta: float = 0.1, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0):
  """KTO (Ethayarajh et al. 2024) over unpaired examples (lm/data/preference.py, format `kto`).

  An example's label travels as the sign of its token weights: +1 desirable, -1 undesirable.
  With r = log pi(y|x) - log ref(y|x), the loss of a desirable example is
  desirable_weight * (1 - sigmoid(beta (r - z))), of an undesirable one
  undesirable_weight * (1 - sigmoid(beta (z - r))). The reference point z = max(0, mean r over
  the (micro)batch's examples), without gradient: the paper estimates the same KL term from
  mismatched prompt/completion pairs, which costs two more forward passes.
  """
  weights = batch['weights'].astype(jnp.float32)
  unsigned = {**batch, 'weights': jnp.abs(weights)}
  policy, n = segment_log_probs(model, unsigned, '')
  ref = jax.lax.stop_gradient(segment_log_probs(reference_of(model), unsigned, '')[0])
  per_segment = jax.vmap(functools.partial(jax.ops.segment_sum, num_segments=weights.shape[1] + 1))
  signed = per_segment(weights, batch['segment_ids'])
  valid = (n > 0).astype(jnp.float32)
  desirable = (signed > 0).astype(jnp.float32) * valid
  undesirable = (signed < 0).astype(jnp.float32) * valid
  reward = policy - ref
  z = jax.lax.stop_gradient(jnp.maximum(jnp.sum(reward * valid) / jnp.maximum(jnp.sum(valid), 1.0), 0.0))
  loss = (desirable * desirable_weight * (1.0 - jax.nn.sigmoid(beta * (reward - z)))
          + undesirable * undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z - reward))))
  label = desirable - undesirable
  total = lambda x: jnp.sum(x * valid)
  return total(loss), jnp.sum(valid), {
      'reward_accuracy': total(label * reward > 0), 'reward_margin': total(label * reward),
      'desirable': total(desirable), 'kl_estimate': total(z * jnp.ones_like(reward))}


DISTILL_LOSSES = ('forward_kl', 'reverse_kl', 'jsd')


def distillation_divergence(student_BTV, teacher_BTV, *, loss: str, temperature: float = 1.0,
                            jsd_beta: float = 0.5):
  """Per-token divergence [B, T] between the teacher's and the student's next-token
  distributions at `temperature`, times temperature^2 (so gradients keep their scale, Hinton
  et al. 2015). forward_kl: KL(teacher || student), mass-covering; reverse_kl: KL(student ||
  teacher), mode-seeking; jsd: beta KL(teacher || M) + (1 - beta) KL(student || M) with
  M = beta teacher + (1 - beta) student (the generalised JSD of GKD, Agarwal et al. 2024)."""
  s = jax.nn.log_softmax(student_BTV / temperature, axis=-1)
  t = jax.nn.log_softmax(teacher_BTV / temperature, axis=-1)
  kl = lambda log_p, log_q: jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  if loss == 'forward_kl':
    out = kl(t, s)
  elif loss == 'reverse_kl':
    out = kl(s, t)
  elif loss == 'jsd':
    m = jnp.logaddexp(t + jnp.log(jsd_beta), s + jnp.log1p(-jsd_beta))
    out = jsd_beta * kl(t, m) + (1.0 - jsd_beta) * kl(s, m)
  else:
    raise ConfigError(f'distill.loss={loss!r}; choose one of {DISTILL_LOSSES}')
  return out * temperature ** 2


def distill(model, batch, *, loss: str = 'forward_kl', temperature: float = 1.0,
            weight: float = 0.5, jsd_beta: float = 0.5):
  """Logit distillation from the state's frozen teacher (`teacher.*`, any size, same vocabulary)
  mixed with SFT: per trained token (1 - weight) * cross-entropy + weight * divergence."""
  if model.teacher is None:
    raise ConfigError('distillation needs a teacher: set --config.distill.teacher and '
                      'train.objective=distill (the Trainer then carries it frozen)')
  # The one objective that keeps the whole [B, T, V] logits, even with model.loss_chunk_size > 0:
  # the divergence needs the student's and the teacher's full distributions at every position.
  args = (batch['tokens'], batch['positions'], batch['segment_ids'])
  student_BTV = model(*args)
  teacher_BTV = jax.lax.stop_gradient(model.teacher(*args))
  xent_BT = optax.softmax_cross_entropy_with_integer_labels(student_BTV, batch['targets'])
  div_BT = distillation_divergence(student_BTV, teacher_BTV, loss=loss, temperature=temperature,
                                   jsd_beta=jsd_beta)
  w_BT = batch['weights'].astype(jnp.float32)
  total = lambda x: jnp.sum(x * w_BT)
  teacher_xent = optax.softmax_cross_entropy_with_integer_labels(teacher_BTV, batch['targets'])
  return total((1.0 - weight) * xent_BT + weight * div_BT), jnp.sum(w_BT), {
      'xent': total(xent_BT), 'divergence': total(div_BT), 'teacher_xent': total(teacher_xent)}


GRPO_LOSSES = ('grpo', 'dr_grpo', 'dapo')
IMPORTANCE_LEVELS = ('token', 'sequence')


def grpo(model, batch, *, clip_low: float = 0.2, clip_high: float = 0.2, kl_coef: float = 0.04,
         loss_type: str = 'grpo', max_completion: int = 1, importance_level: str = 'token',
         teacher_coef: float = 0.0):
  """GRPO's clipped importance-ratio objective (Shao et al. 2024) over completion tokens, and
  through the same code GSPO and on-policy distillation.

  A row is one prompt + sampled completion (lm/train/grpo_loop.py builds them): `weights` mark
  the completion's tokens (0 on a tool's output, which stays in the context), `old_logps` [B, T]
  are their log-probs under the policy that sampled them, `advantages` [B] the group-normalised
  rewards. Per token, with ratio = pi / pi_old:
  -min(ratio A, clip(ratio, 1 - clip_low, 1 + clip_high) A) + kl_coef * KL, KL being the k3
  estimate exp(ref - pi) - (ref - pi) - 1 against the reference (adapters off, or `ref.*`).
  `loss_type` says how tokens are averaged: grpo, the mean over each completion then over
  completions; dapo, the mean over all tokens of the batch; dr_grpo, the sum over each
  completion divided by `max_completion` (Dr. GRPO, Liu et al. 2025: no length bias).
  clip_high > clip_low is DAPO's asymmetric clipping ("clip-higher", Yu et al. 2025).

  importance_level='sequence' is GSPO (Zheng et al. 2025): every token of a completion takes the
  completion's ratio exp(mean over its tokens of log pi - log pi_old), the length-normalised
  sequence likelihood ratio, clipped as one (TRL's importance_sampling_level="sequence").
  teacher_coef > 0 is on-policy distillation (Agarwal et al. 2024; Thinking Machines 2025): the
  frozen teacher (`teacher.*`) scores each sampled token, and the token's advantage is A minus
  teacher_coef * (log pi_old - log teacher), the per-token reverse KL of the sampled token.
  """
  logp_BT = token_log_probs(model, batch)
  w_BT = batch['weights'].astype(jnp.float32)
  tokens_B = jnp.sum(w_BT, axis=1)
  log_ratio_BT = logp_BT - batch['old_logps']
  if importance_level == 'sequence':
    seq_B1 = jnp.sum(log_ratio_BT * w_BT, axis=1, keepdims=True) / jnp.maximum(tokens_B, 1.0)[:, None]
    log_ratio_BT = jnp.broadcast_to(seq_B1, log_ratio_BT.shape)
  elif importance_level != 'token':
    raise ConfigError(f'grpo.importance_level={importance_level!r}; choose one of {IMPORTANCE_LEVELS}')
  ratio_BT = jnp.exp(log_ratio_BT)
  adv_BT = jnp.broadcast_to(batch['advantages'].astype(jnp.float32)[:, None], ratio_BT.shape)
  more = {}
  if teacher_coef:
    if model.teacher is None:
      raise ConfigError('grpo.teacher_coef > 0 is on-policy distillation and needs a teacher: '
                        'set --config.distill.teacher')
    teacher_BT = jax.lax.stop_gradient(token_log_probs(Policy(model.teacher), batch))
    reverse_kl_BT = batch['old_logps'] - teacher_BT
    adv_BT = adv_BT - teacher_coef * reverse_kl_BT
    more['teacher_kl'] = reverse_kl_BT
  clipped_BT = jnp.clip(ratio_BT, 1.0 - clip_low, 1.0 + clip_high)
  per_token = -jnp.minimum(ratio_BT * adv_BT, clipped_BT * adv_BT)
  if kl_coef:
    ref_BT = jax.lax.stop_gradient(token_log_probs(reference_of(model), batch))
    kl_BT = jnp.exp(ref_BT - logp_BT) - (ref_BT - logp_BT) - 1.0
    per_token = per_token + kl_coef * kl_BT
  else:
    kl_BT = jnp.zeros_like(per_token)
  rows = (tokens_B > 0).astype(jnp.float32)
  if loss_type == 'grpo':
    token_w, weight = w_BT / jnp.maximum(tokens_B, 1.0)[:, None], jnp.sum(rows)
  elif loss_type == 'dapo':
    token_w, weight = w_BT, jnp.sum(tokens_B)
  elif loss_type == 'dr_grpo':
    token_w, weight = w_BT / max_completion, jnp.sum(rows)
  else:
    raise ConfigError(f'grpo.loss_type={loss_type!r}; choose one of {GRPO_LOSSES}')
  # Metrics are token means; the step divides sums by `weight`, so scale them to that unit.
  per_weight = weight / jnp.maximum(jnp.sum(tokens_B), 1.0)
  token_mean = lambda x: jnp.sum(x * w_BT) * per_weight
  clipped = (ratio_BT * adv_BT > clipped_BT * adv_BT)  # the clip bound is the one in effect
  return jnp.sum(per_token * token_w), weight, {
      'kl': token_mean(kl_BT), 'clip_fraction': token_mean(clipped.astype(jnp.float32)),
      'ratio': token_mean(ratio_BT), **{k: token_mean(v) for k, v in more.items()}}


def with_router_losses(objective, *, aux_loss_weight: float, z_loss_weight: float,
                       expert_load: bool = False, dropped: bool = False):
  """`objective` plus the Mixture-of-Experts router losses (lm/model/moe.py) the model recorded
  while the objective ran: aux_loss_weight * load balancing + z_loss_weight * router z-loss.

  Both are means (over tokens and layers), so each enters the sum scaled by the batch's weight:
  after the step's division the loss is objective + weighted router losses, as HF adds
  router_aux_loss_coef * aux_loss. Logged, unweighted, as moe_load_balancing and moe_router_z;
  with `expert_load`, each MoE layer's expert load too, for the step's balancing update
  (lm/train/balancing.py), which takes it out of the logged metrics; with `dropped` (a capacity
  limit on expert parallelism), moe_dropped: the share of (token, expert) copies over capacity.
  """

  def objective_with_router_losses(model, batch):
    model.router_losses, model.router_calls = None, 0
    loss_sum, weight_sum, metrics = objective(model, batch)
    if not model.router_calls:
      return loss_sum, weight_sum, metrics
    mean = {k: v / model.router_calls for k, v in model.router_losses.items()}
    router = aux_loss_weight * mean['load_balancing'] + z_loss_weight * mean['router_z']
    metrics = {**metrics, 'moe_load_balancing': mean['load_balancing'] * weight_sum,
               'moe_router_z': mean['router_z'] * weight_sum}
    if expert_load:
      metrics[balancing.EXPERT_LOAD] = mean['expert_load'] * weight_sum
    if dropped:
      metrics['moe_dropped'] = mean['dropped'] * weight_sum
    return loss_sum + router * weight_sum, weight_sum, metrics

  objective_with_router_losses.without_router_losses = objective
  return objective_with_router_losses


def for_evaluation(objective):
  """The objective held-out loss is measured with: without router losses (not a model's fit)."""
  return getattr(objective, 'without_router_losses', objective)


OBJECTIVES = {'next_token_xent': next_token_xent, 'dpo': dpo, 'ipo': ipo, 'simpo': simpo,
              'orpo': orpo, 'kto': kto, 'distill': distill, 'grpo': grpo}
NEEDS_TEACHER = {'distill'}  # and grpo with grpo.teacher_coef > 0 (needs_teacher)
NEEDS_REFERENCE = {'dpo', 'ipo', 'kto', 'grpo'}
PAIRED = {'dpo', 'ipo', 'simpo', 'orpo'}  # read chosen_* / rejected_* rows (data.format=preference)
UNPAIRED = {'kto'}  # read rows of labelled examples (data.format=kto)


def needs_reference(cfg) -> bool:
  """Whether the objective reads a reference policy: the DPO family and KTO, and GRPO with a KL
  term (grpo.kl_coef > 0; without it a full-weight run carries no frozen copy)."""
  if cfg.train.objective == 'grpo':
    return cfg.grpo.kl_coef > 0
  return cfg.train.objective in NEEDS_REFERENCE


def needs_teacher(cfg) -> bool:
  """Whether the state carries a frozen teacher: logit distillation, or GRPO's on-policy
  distillation (grpo.teacher_coef > 0)."""
  return cfg.train.objective in NEEDS_TEACHER or (cfg.train.objective == 'grpo'
                                                  and cfg.grpo.teacher_coef > 0)


def get(name: str):
  if name not in OBJECTIVES:
    raise ConfigError(f'train.objective={name!r}; choose one of {sorted(OBJECTIVES)}')
  return OBJECTIVES[name]


def from_config(cfg):
  """The objective `train.objective` names, with its settings bound (and the router losses of a
  Mixture-of-Experts model)."""
  objective = _bound_objective(cfg)
  moe = cfg.model.moe
  balanced = balancing.active(cfg.model)
  capacity = bool(moe.get('capacity_factor', 0.0))
  if moe.n_experts and (moe.aux_loss_weight or moe.z_loss_weight or balanced or capacity):
    objective = with_router_losses(objective, aux_loss_weight=moe.aux_loss_weight,
                                   z_loss_weight=moe.z_loss_weight, expert_load=balanced,
                                   dropped=capacity)
  return objective


def _bound_objective(cfg):
  name = cfg.train.objective
  if name == 'dpo':
    return functools.partial(dpo, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)
  if name == 'ipo':
    return functools.partial(ipo, beta=cfg.dpo.beta)
  if name == 'simpo':
    return functools.partial(simpo, beta=cfg.preference.simpo_beta, gamma=cfg.preference.simpo_gamma)
  if name == 'orpo':
    return functools.partial(orpo, weight=cfg.preference.orpo_weight)
  if name == 'kto':
    return functools.partial(kto, beta=cfg.dpo.beta,
                             desirable_weight=cfg.preference.kto_desirable_weight,
                             undesirable_weight=cfg.preference.kto_undesirable_weight)
  if name == 'distill':
    if cfg.distill.loss not in DISTILL_LOSSES:
      raise ConfigError(f'distill.loss={cfg.distill.loss!r}; choose one of {DISTILL_LOSSES}')
    if not (cfg.distill.temperature > 0 and 0.0 <= cfg.distill.weight <= 1.0
            and 0.0 < cfg.distill.jsd_beta < 1.0):
      raise ConfigError(f'distill.temperature={cfg.distill.temperature} must be > 0, distill.weight='
                        f'{cfg.distill.weight} in [0, 1], distill.jsd_beta={cfg.distill.jsd_beta} in (0, 1)')
    return functools.partial(distill, loss=cfg.distill.loss, temperature=cfg.distill.temperature,
                             weight=cfg.distill.weight, jsd_beta=cfg.distill.jsd_beta)
  if name == 'grpo':
    g = cfg.grpo
    if g.loss_type not in GRPO_LOSSES:
      raise ConfigError(f'grpo.loss_type={g.loss_type!r}; choose one of {GRPO_LOSSES}')
    if g.importance_level not in IMPORTANCE_LEVELS:
      raise ConfigError(f'grpo.importance_level={g.importance_level!r}; choose one of '
                        f'{IMPORTANCE_LEVELS}')
    return functools.partial(grpo, clip_low=g.clip_low, clip_high=g.clip_high, kl_coef=g.kl_coef,
                             loss_type=g.loss_type, max_completion=g.max_new_tokens,
                             importance_level=g.importance_level, teacher_coef=g.teacher_coef)
  return get(name)


def check_data(cfg) -> None:
  """The objective and data.format agree (paired objectives read pairs, KTO labelled examples)."""
  name, fmt = cfg.train.objective, cfg.data.format
  get(name)
  if name in ('distill', 'grpo'):
    from_config(cfg)  # checks the distill.* / grpo.* settings
  formats = {entry.get('format', fmt) for entry in (cfg.data.mixture or ())} or {fmt}
  if name in PAIRED and formats != {'preference'}:
    raise ConfigError(f'train.objective={name} reads chosen/rejected pairs; set '
                      f'--config.data.format=preference (got {sorted(formats)})')
  if name in UNPAIRED and formats != {'kto'}:
    raise ConfigError(f'train.objective={name} reads labelled examples; set '
                      f'--config.data.format=kto (got {sorted(formats)})')
  if 'kto' in formats and name not in UNPAIRED:
    raise ConfigError(f'data.format=kto holds labelled examples for train.objective=kto, not '
                      f'{name}; set --config.train.objective=kto')
