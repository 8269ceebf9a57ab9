"""Token log-probabilities without the [B, T, V] logits: the unembedding and the softmax in chunks.

The final projection of a large-vocabulary model makes the largest temporaries of a train step:
the float32 logits [B, T, V], their softmax and their gradient (Llama 3: V = 128k, Gemma 3: 262k).
`chunked_token_logprobs` runs the projection and the log-softmax over `chunk` sequence positions at
a time and keeps only [B, T] statistics. Its custom VJP recomputes each chunk's logits in the
backward pass and accumulates the gradients of the hidden states and of the unembedding weights
chunk by chunk, as Liger's fused linear cross-entropy and Cut Cross-Entropy do; the price is one
more [tokens, D] x [D, V] matmul. The result equals the plain path up to float rounding
(tests/train/test_losses.py).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from lm.sharding import constrain


class TokenScores(NamedTuple):
  """Per token [B, T]: log p(target); the log-partition logsumexp(logits) (for a z-loss); whether
  the target has the highest logit (no gradient)."""
  logp: jax.Array
  lse: jax.Array
  correct: jax.Array


def scores_from_logits(logits_BTV, targets_BT) -> TokenScores:
  """The plain path: the same statistics from logits that are already held whole."""
  lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
  target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  # "The target has the highest logit", without argmax: XLA's CPU variadic (value, index)
  # reduce over the vocabulary costs ~5% of a small model's step; a max is nearly free.
  correct_BT = target_BT >= jnp.max(logits_BTV, axis=-1)
  return TokenScores(target_BT - lse_BT, lse_BT, correct_BT)


def chunked_token_logprobs(project: Callable, weights, x_BTD, targets_BT, chunk: int, *,
                           weight_axes=None) -> TokenScores:
  """TokenScores of `project(weights, x) -> float32 logits` without holding more than
  [B, chunk, V] logits at once, forward or backward.

  `project` must be a pure function of (weights, hidden states) that acts on each position alone
  (the unembedding, with any final-logit soft cap inside it); `weights` is any pytree of arrays.
  Gradients flow to `weights` and `x_BTD` through `logp` and `lse`.

  `weight_axes` (the weights' logical axis names, same structure) pins shardings when a mesh is
  active (lm.sharding.constrain): inside the loop XLA would otherwise keep the weights sharded on
  the contracted axis and build every chunk's logits for the whole batch on every chip.
  """
  B, T, D = x_BTD.shape
  C = max(1, min(chunk, T))
  n = -(-T // C)
  pad = n * C - T
  if pad:  # padded positions are sliced off below, so their cotangent is zero
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
  # Chunks along the sequence, each holding every row: the batch axis keeps its sharding.
  x_nBCD = x_BTD.reshape(B, n, C, D).swapaxes(0, 1)
  t_nBC = targets_BT.reshape(B, n, C).swapaxes(0, 1)
  x_nBCD = constrain(x_nBCD, (None, 'batch', None, None))
  t_nBC = constrain(t_nBC, (None, 'batch', None))
  logp, lse, correct = _chunked(project, weight_axes, weights, x_nBCD, t_nBC)
  unchunk = lambda a: a.swapaxes(0, 1).reshape(B, n * C)[:, :T]
  return TokenScores(unchunk(logp), unchunk(lse), unchunk(correct))


def _pin(tree, axes):
  """Constrains each array of `tree` to its logical axes (None: leave as is)."""
  if axes is None:
    return tree
  return jax.tree.map(lambda a, ax: constrain(a, ax), tree, axes)


def _whole_but_vocab(axes):
  """The weights' axes as one chunk's matmul uses them: only the vocabulary stays split."""
  if axes is None:
    return None
  return jax.tree.map(lambda ax: tuple(a if a == 'vocab' else None for a in ax), axes,
                      is_leaf=lambda ax: isinstance(ax, tuple))


def _chunk_logits(project, weight_axes, weights, x_BCD):
  weights = _pin(weights, _whole_but_vocab(weight_axes))
  return constrain(project(weights, constrain(x_BCD, ('batch', None, None))),
                   ('batch', None, 'vocab'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(project, weight_axes, weights, x_nBCD, t_nBC):
  return _chunked_fwd(project, weight_axes, weights, x_nBCD, t_nBC)[0]


def _chunked_fwd(project, weight_axes, weights, x_nBCD, t_nBC):
  def chunk_scores(_, xs):
    x_BCD, t_BC = xs
    return None, tuple(scores_from_logits(_chunk_logits(project, weight_axes, weights, x_BCD), t_BC))

  _, (logp, lse, correct) = jax.lax.scan(chunk_scores, None, (x_nBCD, t_nBC))
  # Only [B, T] statistics and the inputs are kept: no logits survive the forward.
  return (logp, lse, correct), (weights, x_nBCD, t_nBC, lse)


def _chunked_bwd(project, weight_axes, residuals, cotangents):
  weights, x_nBCD, t_nBC, lse_nBC = residuals
  g_logp, g_lse, _ = cotangents

  def chunk_grads(dw_sum, xs):
    x_BCD, t_BC, lse_BC, g_logp_BC, g_lse_BC = xs
    logits_BCV, pullback = jax.vjp(functools.partial(_chunk_logits, project, weight_axes),
                                   weights, x_BCD)
    p_BCV = jnp.exp(logits_BCV - lse_BC[..., None])
    # d logp / d logits = onehot(target) - softmax; d lse / d logits = softmax.
    is_target = jnp.arange(logits_BCV.shape[-1]) == t_BC[..., None]
    dlogits_BCV = ((g_lse_BC - g_logp_BC)[..., None] * p_BCV
                   + jnp.where(is_target, g_logp_BC[..., None], 0.0))
    dw, dx_BCD = pullback(dlogits_BCV.astype(logits_BCV.dtype))
    dw_sum = jax.tree.map(lambda s, d: s + d.astype(s.dtype), dw_sum, dw)
    # The sum stays sharded like the weights (FSDP): each chunk's part is reduce-scattered into it.
    return _pin(dw_sum, weight_axes), constrain(dx_BCD, ('batch', None, None))

  # Weight gradients accumulate in float32 whatever the parameters' dtype.
  zeros = _pin(jax.tree.map(lambda w: jnp.zeros(w.shape, jnp.promote_types(w.dtype, jnp.float32)),
                            weights), weight_axes)
  dw_sum, dx_nBCD = jax.lax.scan(chunk_grads, zeros, (x_nBCD, t_nBC, lse_nBC, g_logp, g_lse))
  dw = jax.tree.map(lambda d, w: d.astype(w.dtype), dw_sum, weights)
  return dw, dx_nBCD, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)
