"""Context parallelism: the `context` mesh axis splits each sequence; attention all-gathers K/V
(model.context_parallel=all_gather) or passes K/V blocks around a ring (ring). On 8 CPU devices,
with packed documents, both equal one device: the attention alone (forward and gradients) and a
whole train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.errors import ConfigError
from lm.config import validate
from lm.model import attention as attention_lib
from lm.model import ring_attention
from lm.train.loop import Trainer
from test_kernels import inputs, packed_segments


@pytest.mark.parametrize('window', [None, 6])
def test_context_parallel_attention_equals_one_device(window):
  q, k, v, cotangent = inputs(2, 32, 4, 2, 8, jnp.float32)
  seg = packed_segments(2, 32, (13, 11, 5), 3)  # documents cross the 8-token shard boundaries

  def value_and_grads(q, k, v):
    fn = lambda q, k, v: attention_lib.attention(q, k, v, seg, window=window)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))

  want = jax.jit(value_and_grads)(q, k, v)
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'context'))
  spread = NamedSharding(mesh, P('data', 'context'))
  with jax.set_mesh(mesh):
    text = str(jax.make_jaxpr(value_and_grads)(q, k, v))
    got = jax.jit(value_and_grads, in_shardings=spread)(q, k, v)
  assert 'all_gather' in text
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


def test_ring_attention_equals_one_device_and_passes_kv_without_gathering():
  """Causal attention over packed documents (crossing the chunk boundaries, then padding), GQA and
  a soft-cap, on a (data 2, context 4) mesh, the XLA form per block. The Pallas kernels' blocks:
  test_kernels.py::test_a_block_of_ring_attention_matches_the_xla_block."""
  q, k, v, cotangent = inputs(2, 32, 4, 2, 8, jnp.float32)
  seg = packed_segments(2, 32, (13, 11, 5), 3)

  def value_and_grads(q, k, v, seg, cotangent):
    fn = lambda q, k, v: attention_lib.attention(q, k, v, seg, softcap=20.0)
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(cotangent))

  want = jax.jit(value_and_grads)(q, k, v, seg, cotangent)
  mesh = Mesh(np.asarray(jax.devices()).reshape(2, 4), ('data', 'context'))
  in_ring_order = lambda x: np.asarray(ring_attention.to_ring_order(x, 4))

  def ring(*args):
    with ring_attention.ring_layout():
      return value_and_grads(*args)

  with jax.set_mesh(mesh):
    step = jax.jit(ring, in_shardings=NamedSharding(mesh, P('data', 'context')))
    args = [in_ring_order(x) for x in (q, k, v, seg, cotangent)]
    hlo = step.lower(*args).compile().as_text()
    got = step(*args)
  # K, V and their segment ids move 3 times forward and 3 times backward (a different ring
  # direction, so XLA cannot merge them and keep the forward's blocks for the backward), dK/dV
  # 3 times plus the last hop home. Nothing is gathered.
  assert hlo.count(' collective-permute(') == 3 * 3 + 3 * 5 + 2
  assert 'all-gather' not in hlo
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, in_ring_order(w), atol=2e-6, rtol=1e-5)


def test_ring_order_balances_the_causal_work():
  """Device d holds chunks d and 2C-1-d: the same number of visible (query, key) pairs on every
  device, and every token exactly once."""
  T, C = 64, 4
  order = ring_attention.ring_order(T, C)
  assert sorted(order) == list(range(T))
  pairs_per_device = (order + 1).reshape(C, -1).sum(axis=1)  # a query at i sees keys 0..i
  assert len(set(pairs_per_device)) == 1
  x = np.arange(2 * T).reshape(2, T)
  np.testing.assert_array_equal(ring_attention.to_ring_order(x, C), x[:, order])


def _one_step(c, devices):
  trainer = Trainer(c, devices=devices)
  batch = random_batch(c, docs_per_row=3)
  state, metrics = trainer.step(trainer.init_state(), trainer.global_batch(batch))
  return float(metrics['loss']), jax.device_get(state.params)


@pytest.fixture(scope='module')
def one_device_step():
  c = tiny_config()
  c.optimizer.name = 'sgd'  # an update linear in the gradient: Adam's first step amplifies
  return c, _one_step(c, jax.devices()[:1])  # float noise in gradients near zero into lr-sized steps


@pytest.mark.parametrize('context_parallel', ['all_gather', 'ring'])
def test_a_train_step_split_over_context_equals_one_device(one_device_step, context_parallel):
  one, (want_loss, want_params) = one_device_step
  split = one.copy_and_resolve_references()
  split.mesh.shape.update(data=2, context=4)
  split.model.context_parallel = context_parallel
  loss, params = _one_step(split, jax.devices())
  assert loss == pytest.approx(want_loss, rel=1e-6)
  for name, value in want_params.items():
    np.testing.assert_allclose(params[name], value, atol=1e-6, err_msg=name)


def test_a_sequence_that_does_not_split_is_one_line():
  c = tiny_config()
  c.mesh.shape.update(data=1, context=-1)  # 8 devices; seq_len 16 splits
  c.data.seq_len = 12
  with pytest.raises(ConfigError, match=r'^data.seq_len=12 does not split over mesh.shape.context=8'):
    Trainer(c)


def test_ring_needs_two_chunks_per_device_and_no_linear_layers():
  c = tiny_config()
  c.mesh.shape.update(data=1, context=-1)  # 8 devices: 16 chunks, and seq_len 16 makes 16 of 1
  c.model.context_parallel = 'ring'
  c.data.seq_len = 24
  with pytest.raises(ConfigError, match=r'^data.seq_len=24 does not split into 2 x mesh.shape.context=8 '
                     r'equal chunks for model.context_parallel=ring; use a multiple of 16$'):
    Trainer(c)
  c = tiny_config(layer_types=('linear', 'full'), context_parallel='ring')
  with pytest.raises(ConfigError, match=r'^model.context_parallel=ring .* linear .*; use '
                     r'model.context_parallel=all_gather$'):
    validate(c)
