"""Routers: which k of E experts each token goes to, and with what weight, as each family computes
it (`model.moe.router`). Everything here is float32: in bfloat16 the top-k choice flips between
near-equal experts.

  softmax       Mixtral, Qwen3-MoE, Qwen3-Next, Qwen3.5-MoE: softmax over all E logits, then the
                top k probabilities, renormalised to sum to 1 when `norm_topk_prob`.
  sigmoid       DeepSeek-V3, GLM-4.5: scores sigmoid(logits). The k experts are chosen by score +
                correction bias (a per-expert bias that steers the choice only: the weight is the
                plain score), among the experts of the `topk_group` groups (of `n_group`) whose two
                best biased scores sum highest. Weights renormalised when `norm_topk_prob`.
  topk_softmax  gpt-oss: the top k logits (router bias included), softmax over those k.
  topk_sigmoid  Llama 4: the top k logits, each weight sigmoid(its logit). The weight scales the
                expert's input, not its output (lm/model/moe.py does that part).
  scaled_softmax  Gemma 4: as softmax (Gemma 4 renormalises), then each weight times its expert's
                learned scale (`expert_scale_E`). Its logits come from the token RMS-normalised
                without weight, times a learned scale [D] and D^-1/2 (lm/model/moe.py does that).

Every kind then multiplies the weights by `routed_scaling_factor` (1 but for DeepSeek-V3 and
GLM-4.5 checkpoints that set it).

Shapes: N tokens, E experts, G groups, k experts per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ('softmax', 'sigmoid', 'topk_softmax', 'topk_sigmoid', 'scaled_softmax')
INPUT_WEIGHTED = ('topk_sigmoid',)  # kinds whose weight scales the expert's input


def _group_limited(choice_NE, n_group: int, topk_group: int):
  """choice_NE with the experts outside each token's `topk_group` best groups set to -inf; a
  group scores the sum of its two best experts (DeepSeek-V3's rule)."""
  N, E = choice_NE.shape
  groups_NGe = choice_NE.reshape(N, n_group, E // n_group)
  group_scores_NG = jnp.sum(jax.lax.top_k(groups_NGe, 2)[0], axis=-1)
  _, top_groups_Nt = jax.lax.top_k(group_scores_NG, topk_group)
  keep_NG = jnp.any(top_groups_Nt[:, :, None] == jnp.arange(n_group), axis=1)
  keep_NE = jnp.repeat(keep_NG, E // n_group, axis=-1)
  return jnp.where(keep_NE, choice_NE, -jnp.inf)


def route(kind: str, logits_NE, k: int, *, correction_E=None, n_group: int = 1,
          topk_group: int = 1, norm_topk_prob: bool = True, scale: float = 1.0,
          expert_scale_E=None):
  """(weights [N, k] float32, expert ids [N, k]) for router logits [N, E] (bias included);
  `expert_scale_E` [E]: the scaled_softmax router's per-expert scales."""
  logits_NE = logits_NE.astype(jnp.float32)
  if kind in ('softmax', 'scaled_softmax'):
    weights_Nk, experts_Nk = jax.lax.top_k(jax.nn.softmax(logits_NE, axis=-1), k)
  elif kind == 'sigmoid':
    scores_NE = jax.nn.sigmoid(logits_NE)
    choice_NE = scores_NE if correction_E is None else scores_NE + correction_E.astype(jnp.float32)
    if n_group > 1:
      choice_NE = _group_limited(choice_NE, n_group, topk_group)
    _, experts_Nk = jax.lax.top_k(choice_NE, k)
    weights_Nk = jnp.take_along_axis(scores_NE, experts_Nk, axis=-1)
  elif kind == 'topk_softmax':
    top_Nk, experts_Nk = jax.lax.top_k(logits_NE, k)
    weights_Nk = jax.nn.softmax(top_Nk, axis=-1)
  elif kind == 'topk_sigmoid':
    top_Nk, experts_Nk = jax.lax.top_k(logits_NE, k)
    weights_Nk = jax.nn.sigmoid(top_Nk)
  else:
    raise ValueError(f'unknown router {kind!r}; lm implements {", ".join(KINDS)}')
  if norm_topk_prob and kind in ('softmax', 'sigmoid', 'scaled_softmax'):
    # DeepSeek-V3/GLM-4.5 add 1e-20 (all-zero sigmoid scores); a softmax's top k never sum
    # below k/E, where adding 1e-20 changes no float32 bit.
    weights_Nk = weights_Nk / (jnp.sum(weights_Nk, axis=-1, keepdims=True) + 1e-20)
  if kind == 'scaled_softmax':
    weights_Nk = weights_Nk * jnp.take(expert_scale_E.astype(jnp.float32), experts_Nk)
  if scale != 1.0:
    weights_Nk = weights_Nk * scale
  return weights_Nk, experts_Nk


def bias_update(correction_LE, expert_fraction_LE, rate: float):
  """DeepSeek-V3's aux-loss-free balancing: each expert's correction bias moves by `rate`
  towards balance, up when it took less than the mean load of its layer, down when more
  (sign(mean - load); an expert at the mean stays). Outside the gradient: the bias only steers
  the choice, which has no gradient anyway."""
  load = expert_fraction_LE.astype(jnp.float32)
  step = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return (correction_LE.astype(jnp.float32) + rate * step).astype(correction_LE.dtype)
