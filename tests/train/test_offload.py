"""train.offload=host: the optimizer state in pinned host memory between steps, the same step."""

import types

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.errors import ConfigError
from lm.train import offload
from lm.train.loop import Trainer


def _steps(offload_to, steps=3):
  c = tiny_config()
  c.data.update(batch_size=2)
  c.train.offload = offload_to
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  losses = []
  for i in range(steps):
    state, metrics = trainer.step(state, trainer.global_batch(random_batch(c, seed=i)))
    losses.append(float(metrics['loss']))
  return losses, state


def test_offloaded_optimizer_trains_exactly_as_on_the_device():
  plain_losses, plain = _steps('device')
  host_losses, host = _steps('host')
  assert host_losses == plain_losses and len(set(plain_losses)) == 3
  kinds = {leaf.sharding.memory_kind for leaf in jax.tree.leaves(host.opt_state)}
  assert kinds == {offload.HOST}
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(host.params)} == {'device'}
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(host)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_devices_without_host_memory_are_one_line():
  memory = lambda kind: types.SimpleNamespace(kind=kind)
  device = types.SimpleNamespace(platform='tpu', addressable_memories=lambda: [memory('device')])
  with pytest.raises(ConfigError, match=r'^train.offload=host: tpu devices offer no pinned_host '
                                        r'memory \(they have device\); use train.offload=device$'):
    offload.check_supported([device])
  offload.check_supported(jax.devices()[:1])  # this CPU has pinned_host
