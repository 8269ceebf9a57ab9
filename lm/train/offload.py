"""Optimizer state in host memory between steps (`train.offload=host`).

AdamW's two moments are twice the float32 parameters: 59.8 GiB of an 8B full fine-tune, more than
its parameters and gradients together. With `train.offload=host` they live in pinned host memory
(JAX memory kinds): the state's optimizer shardings carry `memory_kind='pinned_host'`, and the
step fetches the state to device memory where it starts and puts the updated state back where it
ends. The step itself is unchanged, so the arithmetic is the same as on the device: an offloaded
run's losses equal the plain run's exactly (tests/train/test_offload.py). The price is the
transfer both ways every step over PCIe (or the TPU host link).
"""

from __future__ import annotations

import jax

from lm.errors import ConfigError

HOST = 'pinned_host'


def host_shardings(shardings):
  """The same shardings with their arrays in pinned host memory."""
  return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def check_supported(devices, setting: str = 'train.offload=host') -> None:
  """One line when `devices` have no pinned host memory to offload to."""
  kinds = {m.kind for m in devices[0].addressable_memories()}
  # The compile-only GPU client lists no memories, yet its compiler places buffers in host memory
  # as asked (jax.memory.Space in the step, lm/bench/plan.py for its arguments).
  if HOST not in kinds and not (devices[0].platform == 'gpu' and not kinds):
    raise ConfigError(f'{setting}: {devices[0].platform} devices offer no {HOST} memory '
                      f'(they have {", ".join(sorted(kinds)) or "no memory kinds"}); use '
                      'train.offload=device')


def streamed(step):
  """`step(state, batch)` with `state.opt_state` fetched to device memory on entry and put back
  in host memory on exit."""

  def run(state, batch):
    state = state.replace(opt_state=jax.device_put(state.opt_state, jax.memory.Space.Device))
    state, metrics = step(state, batch)
    return state.replace(opt_state=jax.device_put(state.opt_state, jax.memory.Space.Host)), metrics

  return run
