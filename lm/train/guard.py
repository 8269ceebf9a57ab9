"""The numerical guard: a step whose loss or gradient is not finite, whose update would leave a
non-finite weight, or whose loss spikes, is skipped (parameters and optimizer state stay as they
were) and counted; so a checkpoint never holds a non-finite weight.

It is data-independent: the step always computes the update and `select`s between the new and the
old state, so there is no host round trip and no branch in the compiled step. The state lives in
the train state, so it is checkpointed with it and a resumed run skips exactly the same steps.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class GuardState:
  recent_loss_W: jax.Array  # ring buffer of the last W accepted losses
  accepted: jax.Array  # accepted steps so far; the ring's write position is accepted % W
  streak: jax.Array  # consecutive skipped steps
  skipped: jax.Array  # skipped steps in total


def init(window: int) -> GuardState:
  return GuardState(recent_loss_W=jnp.zeros((max(window, 1),), jnp.float32),
                    accepted=jnp.zeros((), jnp.int32), streak=jnp.zeros((), jnp.int32),
                    skipped=jnp.zeros((), jnp.int32))


def all_finite(tree) -> jax.Array:
  """True when every element of every array in `tree` is finite (one fused reduction)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def check(guard: GuardState, loss, grad_norm, spike_zscore: float, weights_finite=True):
  """(ok, next guard state). A spike is a loss more than `spike_zscore` standard deviations above
  the mean of the last W accepted losses, once W have been seen; `spike_zscore=0` turns it off.
  `weights_finite` says whether the updated weights are all finite (a finite gradient times a huge
  learning rate can overflow them)."""
  W = guard.recent_loss_W.shape[0]
  mean, std = jnp.mean(guard.recent_loss_W), jnp.std(guard.recent_loss_W)
  z = (loss - mean) / jnp.maximum(std, 1e-6)
  spike = (spike_zscore > 0) & (guard.accepted >= W) & (z > spike_zscore)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & weights_finite & ~spike
  recent = guard.recent_loss_W.at[guard.accepted % W].set(loss.astype(jnp.float32))
  return ok, GuardState(recent_loss_W=jnp.where(ok, recent, guard.recent_loss_W),
                        accepted=guard.accepted + ok, streak=jnp.where(ok, 0, guard.streak + 1),
                        skipped=guard.skipped + (~ok))


def select(ok, new, old):
  """`new` where the step was accepted, else `old`, leaf by leaf."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def metrics(ok, guard: GuardState, weights_finite=True) -> dict:
  return {'skipped': 1.0 - ok.astype(jnp.float32), 'skipped_total': guard.skipped,
          'bad_streak': guard.streak,
          'nonfinite_weights': 1.0 - jnp.asarray(weights_finite).astype(jnp.float32)}
