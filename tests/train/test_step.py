import jax
import numpy as np
import optax
import pytest
from conftest import random_batch, tiny_config, train_steps

from lm.train import partition
from lm.errors import ConfigError
from lm.train.loop import Trainer


def _run(c, steps=3, devices=None, seed=0):
  trainer = Trainer(c, devices=devices)
  state = trainer.init_state()
  losses = []
  for i in range(steps):
    state, m = trainer.step(state, trainer.global_batch(random_batch(c, seed=seed + i)))
    losses.append(float(m['loss']))
  return trainer, state, losses


def test_loss_falls_on_a_repeated_batch(cfg):
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  state = trainer.init_state()
  batch = trainer.global_batch(random_batch(cfg))
  losses = []
  for _ in range(10):
    state, m = trainer.step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.5
  assert int(state.step) == 10


def test_k_microbatches_equal_one_batch():
  one = tiny_config()
  four = tiny_config()
  four.train.microbatches = 4
  for c in (one, four):  # plain SGD: the update is the gradient, with no Adam sign amplification
    c.optimizer.update(name='sgd', b1=0.0, grad_clip=0.0)
  batch = random_batch(one, docs_per_row=2)
  batch['weights'][:3, 5:] = 0.0  # uneven weights: normalisation must be over the whole batch
  results = []
  for c in (one, four):
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.init_state()
    state, m = trainer.step(state, trainer.global_batch(batch))
    results.append((state.params, m))
  (p1, m1), (p4, m4) = results
  np.testing.assert_allclose(m1['loss'], m4['loss'], rtol=1e-6)
  np.testing.assert_allclose(m1['grad_norm'], m4['grad_norm'], rtol=1e-5)
  for k in p1:
    np.testing.assert_allclose(p1[k], p4[k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('shape', [dict(data=8, fsdp=1, tensor=1), dict(data=2, fsdp=2, tensor=2),
                                   dict(data=1, fsdp=4, tensor=2)])
def test_sharded_step_equals_single_device(shape):
  single = tiny_config()
  _, _, expected = _run(single, devices=jax.devices()[:1])
  sharded = tiny_config()
  sharded.mesh.shape.update(shape)
  trainer, state, losses = _run(sharded)
  np.testing.assert_allclose(losses, expected, rtol=2e-5)
  # The parameters really are distributed as the rules say.
  q = state.params['layers.attn.q.kernel']
  assert len(q.sharding.device_set) == 8
  if shape['tensor'] > 1:
    assert q.addressable_shards[0].data.shape[2] == q.shape[2] // shape['tensor']


def test_frozen_parameters_get_no_gradient_update_or_optimizer_state():
  c = tiny_config()
  c.train.trainable = r'regex:^layers\.mlp\.'
  trainer, state, before, after = train_steps(c)
  for name in before:
    changed = not np.array_equal(before[name], after[name])
    assert changed == name.startswith('layers.mlp.'), name
  # Optimizer moments exist only for trainable parameters.
  moment_names = {getattr(path[-1], 'key', None)
                  for path, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  trainable = {n for n, l in trainer.labels.items() if l == partition.TRAINABLE}
  assert trainable <= moment_names
  assert not (moment_names & (set(before) - trainable))
  n_state = sum(x.size for x in jax.tree.leaves(state.opt_state))
  n_trainable = sum(before[n].size for n in trainable)
  assert n_state <= 2 * n_trainable + 8  # two Adam moments plus counters


def test_gradient_is_taken_only_for_trainable_parameters():
  """The compiled step must not compute weight gradients of frozen matrices (their FLOPs)."""
  def step_flops(trainable):
    c = tiny_config(vocab_size=4096)
    c.train.trainable = trainable
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.init_state()
    batch = trainer.global_batch(random_batch(c))
    return trainer.step.lower(state, batch).compile().cost_analysis()['flops']
  full, head_frozen = step_flops('all'), step_flops(r'regex:^(?!lm_head)')
  # Freezing the 32x4096 head removes its weight gradient: 2*B*T*D*V FLOPs.
  assert full - head_frozen >= 0.9 * 2 * 8 * 16 * 32 * 4096


def test_optimizer_choices_and_schedule(cfg):
  for name in ('adamw', 'lion', 'adafactor'):
    cfg.optimizer.name = name
    _, _, losses = _run(cfg, steps=2, devices=jax.devices()[:1])
    assert np.isfinite(losses).all()
  from lm.train.optim import make_schedule
  cfg.optimizer.update(lr=1.0, warmup_steps=10, schedule='cosine', end_lr_ratio=0.1)
  sched = make_schedule(cfg.optimizer, 110)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(110)) - 0.1) < 1e-6


def test_weight_decay_skips_norms_biases_and_embeddings():
  from lm.train.optim import decay_mask
  mask = decay_mask(['embed', 'layers.attn_norm.scale', 'layers.attn.q.bias', 'layers.attn.q.kernel'],
                    ('norm', 'bias', 'embed'))
  assert mask == {'embed': False, 'layers.attn_norm.scale': False, 'layers.attn.q.bias': False,
                  'layers.attn.q.kernel': True}


def test_batch_not_divisible_by_data_parallelism_is_a_clear_error():
  c = tiny_config()
  c.mesh.shape.update(data=-1)
  c.data.batch_size = 12
  with pytest.raises(ConfigError, match='not divisible by the 8-way data parallelism'):
    Trainer(c)


def test_impossible_mesh_is_a_clear_error():
  c = tiny_config()
  c.mesh.shape.update(data=3, fsdp=1, tensor=1)
  with pytest.raises(ConfigError, match='needs 3 devices but 8 are present'):
    Trainer(c)


del optax
