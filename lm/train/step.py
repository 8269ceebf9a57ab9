"""The one train step, shared by every mode.

What differs between pretraining, fine-tuning, LoRA and preference tuning arrives as inputs built
elsewhere: the objective (lm/train/objectives.py), the parameter labels (lm/train/partition.py) and the
optimizer built over them (lm/train/optim.py). The gradient is taken only with respect to the trainable
parameters, so frozen ones cost neither gradient memory nor optimizer state. A step whose loss,
gradient or updated weights are not finite, or whose loss spikes, leaves the state as it was
(lm/train/guard.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from lm.train import balancing
from lm.train import guard as guard_lib
from lm.train import partition
from lm.train.state import ModelSpec, TrainState


def _split_microbatches(batch: dict, k: int) -> dict:
  """[B, ...] -> [k, B/k, ...] taking every k-th row, so each microbatch keeps the batch's
  data-parallel layout (each device holds its share of every microbatch)."""
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(spec: ModelSpec, objective, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, labels: dict, microbatches: int = 1, *,
                    seed: int = 0, spike_zscore: float = 0.0, state_update=balancing.keep):
  """Returns step(state, batch) -> (state, metrics). Jit it with shardings and donate the state.

  `state_update(params, metrics, ok) -> (params, metrics)` runs after the optimizer, outside the
  gradient: parameters moved by what the step measured rather than by a gradient (the MoE
  correction bias, lm/train/balancing.py); `ok` says whether the guard kept the step.

  Randomness in the model (adapter dropout) comes from (seed, step, microbatch), so a resumed run
  draws the same masks as an uninterrupted one.
  """

  def loss_sums(trainable, frozen, batch, rng):
    loss_sum, weight_sum, aux = objective(spec.bind({**trainable, **frozen}, rng=rng), batch)
    return loss_sum, (weight_sum, aux)

  grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

  def step(state: TrainState, batch: dict):
    trainable, frozen = partition.split(state.params, labels)
    rng = jax.random.fold_in(jax.random.key(seed), state.step)

    if microbatches == 1:  # no loop: a one-trip scan still copies the gradient sums in and out
      (loss_sum, (weight_sum, aux_sums)), grad_sums = grad_fn(trainable, frozen, batch,
                                                             jax.random.fold_in(rng, 0))
    else:
      micro = _split_microbatches(batch, microbatches)
      first = jax.tree.map(lambda x: x[0], micro)
      _, aux_shape = jax.eval_shape(lambda: objective(spec.bind(state.params), first)[1:])

      def accumulate(sums, xs):
        microbatch, i = xs
        (l, (w, a)), g = grad_fn(trainable, frozen, microbatch, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, sums, (g, l, w, a)), None

      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           (trainable, jnp.zeros(()), jnp.zeros(()), aux_shape))
      (grad_sums, loss_sum, weight_sum, aux_sums), _ = jax.lax.scan(
          accumulate, zeros, (micro, jnp.arange(microbatches)))

    denom = jnp.maximum(weight_sum, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sums)
    # set_to_zero ignores the frozen entries; XLA drops these zeros, they only complete the tree.
    full_grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen)}

    def apply_update(params, opt_state):
      updates, opt_state = tx.update(full_grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
    # The guard needs every updated weight checked before it may keep any. Checked on the update
    # that is kept, XLA fuses the check with the update and holds all the updated weights until
    # the answer is known: a second copy of the parameters (7.5 GiB per chip in the 8B step of
    # docs/pretraining.md). The check runs on its own computation of the same update instead,
    # from the state behind a barrier that keeps XLA from merging the two; each streams.
    checked_params, _ = apply_update(*jax.lax.optimization_barrier((state.params, state.opt_state)))
    weights_finite = guard_lib.all_finite(partition.split(checked_params, labels)[0])
    ok, guard = guard_lib.check(state.guard, loss, grad_norm, spike_zscore, weights_finite)
    params, opt_state = guard_lib.select(ok, apply_update(state.params, state.opt_state),
                                         (state.params, state.opt_state))
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(state.step), 'tokens': weight_sum,
               **{k: v / denom for k, v in aux_sums.items()},
               **guard_lib.metrics(ok, guard, weights_finite)}
    params, metrics = state_update(params, metrics, ok)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, guard=guard), metrics

  return step


def make_eval_step(spec: ModelSpec, objective):
  """eval(params, batch) -> {'loss_sum', 'weight_sum', 'metric_sums'}; summed over batches by
  the caller (the objective's own metrics, e.g. reward accuracy and margin for preferences)."""

  def eval_step(params, batch):
    loss_sum, weight_sum, aux = objective(spec.bind(params), batch)
    return {'loss_sum': loss_sum, 'weight_sum': weight_sum, 'metric_sums': aux}

  return eval_step
