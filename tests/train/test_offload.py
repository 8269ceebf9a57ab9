"""train.offload=host (the optimizer state in pinned host memory between steps, the same step) and
train.frozen_dtype (the frozen base stored in another dtype)."""

import types

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.errors import ConfigError
from lm.train import offload
from lm.train.loop import Trainer


def _steps(**train):
  """Losses of 3 LoRA steps in bfloat16 compute, and the state after them."""
  c = tiny_config(compute_dtype='bfloat16')
  c.data.update(batch_size=2)
  c.model.lora.update(rank=4)
  c.train.update(trainable='lora', **train)
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  losses = []
  for i in range(3):
    state, metrics = trainer.step(state, trainer.global_batch(random_batch(c, seed=i)))
    losses.append(float(metrics['loss']))
  return losses, state, trainer.labels


def test_adam_in_host_memory_and_a_bfloat16_frozen_base_train_exactly_as_the_plain_step():
  # The frozen weights are read in the compute dtype anyway (norm scales start at 1.0, which
  # bfloat16 holds exactly), and the offloaded step is the same step: equal bit for bit.
  plain_losses, plain, labels = _steps()
  losses, state, _ = _steps(offload='host', frozen_dtype='bfloat16')
  assert losses == plain_losses and len(set(losses)) == 3
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.opt_state)} == {offload.HOST}
  assert {leaf.sharding.memory_kind for leaf in jax.tree.leaves(state.params)} == {'device'}
  for a, b in zip(jax.tree.leaves(plain.opt_state), jax.tree.leaves(state.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for name, label in labels.items():
    a, b = np.asarray(plain.params[name]), np.asarray(state.params[name])
    if label == 'trainable':
      np.testing.assert_array_equal(a, b)
    else:
      assert state.params[name].dtype == jax.numpy.bfloat16
      np.testing.assert_array_equal(a.astype(jax.numpy.bfloat16), b)


def test_devices_without_host_memory_are_one_line():
  memory = lambda kind: types.SimpleNamespace(kind=kind)
  device = types.SimpleNamespace(platform='tpu', addressable_memories=lambda: [memory('device')])
  with pytest.raises(ConfigError, match=r'^train.offload=host: tpu devices offer no pinned_host '
                                        r'memory \(they have device\); use train.offload=device$'):
    offload.check_supported([device])
  offload.check_supported(jax.devices()[:1])  # this CPU has pinned_host
