"""Context parallelism: the `context` mesh axis splits each sequence; attention all-gathers K/V.
On 8 CPU devices, with packed documents, it equals one device: the attention alone (forward and
gradients) and a whole train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.errors import ConfigError
from lm.model import attention as attention_lib
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


def test_a_train_step_split_over_context_equals_one_device():
  one = tiny_config()
  one.optimizer.name = 'sgd'  # an update linear in the gradient: Adam's first step amplifies
  split = one.copy_and_resolve_references()  # float noise in gradients near zero into lr-sized steps
  split.mesh.shape.update(data=2, context=4)
  batch = random_batch(one, docs_per_row=3)
  results = []
  for c, devices in ((one, jax.devices()[:1]), (split, jax.devices())):
    trainer = Trainer(c, devices=devices)
    state, metrics = trainer.step(trainer.init_state(), trainer.global_batch(batch))
    results.append((float(metrics['loss']), jax.device_get(state.params)))
  assert results[1][0] == pytest.approx(results[0][0], rel=1e-6)
  for name, value in results[0][1].items():
    np.testing.assert_allclose(results[1][1][name], value, atol=1e-6, err_msg=name)


def test_a_sequence_that_does_not_split_is_one_line():
  c = tiny_config()
  c.mesh.shape.update(data=1, context=-1)  # 8 devices; seq_len 16 splits
  c.data.seq_len = 12
  with pytest.raises(ConfigError, match=r'^data.seq_len=12 does not split over mesh.shape.context=8'):
    Trainer(c)
