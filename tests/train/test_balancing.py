"""Aux-loss-free balancing (DeepSeek-V3): the sigmoid router's correction bias moves by the step's
expert load through the one train step, outside the gradient, and survives a checkpoint."""

import jax
import numpy as np
from conftest import random_batch, tiny_config

from lm.model import routers
from lm.train import partition
from lm.train.checkpoint import Checkpointer
from lm.train.loop import Trainer

RATE = 0.01
BIAS = 'layers.moe.correction_bias'


def balanced_config(**train):
  c = tiny_config()
  c.model.moe.update(n_experts=8, experts_per_token=2, expert_dim=16, router='sigmoid', n_group=4,
                     topk_group=2, bias_update_rate=RATE)
  c.train.update(train)
  return c


def expert_load(spec, params, batch):
  """Each MoE layer's expert load [L, E] on `batch`, as the forward pass records it."""
  model = spec.bind(params)
  model(batch['tokens'], batch['positions'], batch['segment_ids'])
  return np.asarray(model.router_losses['expert_load'])


def test_correction_bias_moves_by_the_load_not_the_gradient_and_resumes_exactly(tmp_path):
  c = balanced_config()
  trainer = Trainer(c, devices=jax.devices()[:1])
  assert trainer.labels[BIAS] == partition.FROZEN  # no gradient, no optimizer state, no decay
  state = trainer.init_state()
  batches = [trainer.global_batch(random_batch(c, seed=i)) for i in range(3)]
  before = np.asarray(state.params[BIAS])
  load = expert_load(trainer.spec, state.params, batches[0])
  state, metrics = trainer.step(state, batches[0])
  after = np.asarray(state.params[BIAS])
  # Exactly one step of size RATE per expert, towards the layer's mean load.
  np.testing.assert_allclose(after, np.asarray(routers.bias_update(before, load, RATE)), atol=0)
  assert set(np.unique(np.round((after - before) / RATE))) <= {-1.0, 0.0, 1.0}
  assert np.any(after != before)
  assert 'moe_expert_load' not in metrics and float(metrics['moe_max_load']) > 1.0

  # Checkpointed with the state, and a resumed run continues it exactly.
  ckpt = Checkpointer(str(tmp_path), async_save=False, labels=trainer.labels)
  ckpt.save(1, state, {})
  ckpt.wait()
  straight = state
  for batch in batches[1:]:
    straight, _ = trainer.step(straight, batch)
  resumed, _ = ckpt.restore(trainer.abstract_state, trainer.shardings)
  np.testing.assert_array_equal(np.asarray(resumed.params[BIAS]), after)
  for batch in batches[1:]:
    resumed, _ = trainer.step(resumed, batch)
  for name in straight.params:
    np.testing.assert_array_equal(np.asarray(resumed.params[name]),
                                  np.asarray(straight.params[name]), err_msg=name)
  ckpt.close()


def test_the_update_walks_a_skewed_bias_back_to_balance():
  """Experts 0 and 1 start with a bias that sends them most tokens; with nothing else training
  (the norms, at a negligible rate), the update alone brings the load back towards even."""
  c = balanced_config(trainable='norms')
  c.model.moe.update(bias_update_rate=0.05, n_group=1, topk_group=1)
  c.optimizer.lr = 1e-9
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  skewed = np.zeros(state.params[BIAS].shape, np.float32)
  skewed[..., :2] = 0.3
  state = state.replace(params={**state.params, BIAS: jax.numpy.asarray(skewed)})
  batch = trainer.global_batch(random_batch(c))
  peaks = []
  for _ in range(10):
    state, metrics = trainer.step(state, batch)
    peaks.append(float(metrics['moe_max_load']))
  assert peaks[0] > 3.0  # experts 0 and 1 take nearly every token: 4x the mean of 8 experts
  assert max(peaks[-3:]) < 0.6 * peaks[0], peaks
