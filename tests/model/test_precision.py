"""The in-loop weight cast (lm/model/precision.py): bit-identical to astype, same gradient, and
left inside the layer loop when compiled for a TPU."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lm.model import precision


def _edge_and_random_float32():
  rng = np.random.default_rng(0)
  random = (rng.standard_normal(200_000) * np.exp(rng.standard_normal(200_000) * 20)).astype(np.float32)
  one = np.float32(1.0)
  edges = np.array([
      0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, np.finfo(np.float32).max, -np.finfo(np.float32).max,
      np.finfo(np.float32).tiny, 1e-45, -1e-45, 3.3895314e38,  # rounds up past bf16's largest
      one + 2 ** -8, one + 3 * 2 ** -8, one + 2 ** -8 + 2 ** -20,  # ties to even, and just past a tie
  ], np.float32)
  nan_payload = np.array([0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF], np.uint32).view(np.float32)
  return np.concatenate([random, edges, nan_payload])


def test_float32_to_bfloat16_is_bit_identical_to_astype():
  x = jnp.asarray(_edge_and_random_float32())
  got = np.asarray(precision.to_compute_dtype(x, jnp.bfloat16))
  want = np.asarray(x.astype(jnp.bfloat16))
  assert got.dtype == want.dtype == jnp.bfloat16
  nan = np.isnan(want.astype(np.float32))
  assert np.array_equal(np.isnan(got.astype(np.float32)), nan)
  np.testing.assert_array_equal(got.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_gradient_is_the_cotangent_cast_back():
  w = jnp.linspace(-3.0, 3.0, 97, dtype=jnp.float32)
  x = jnp.linspace(0.5, 1.5, 97, dtype=jnp.bfloat16)

  def loss(cast, w):
    return jnp.sum((cast(w) * x).astype(jnp.float32) ** 2)

  ours = jax.grad(lambda w: loss(lambda v: precision.to_compute_dtype(v, jnp.bfloat16), w))(w)
  plain = jax.grad(lambda w: loss(lambda v: v.astype(jnp.bfloat16), w))(w)
  assert ours.dtype == jnp.float32
  np.testing.assert_array_equal(ours, plain)


@pytest.mark.parametrize('src, dst', [('float32', 'float32'), ('bfloat16', 'float32'),
                                      ('float32', 'float16')])
def test_other_dtype_pairs_are_a_plain_astype(src, dst):
  x = jnp.linspace(-2.0, 2.0, 11, dtype=src)
  got = precision.to_compute_dtype(x, dst)
  assert got.dtype == jnp.dtype(dst)
  np.testing.assert_array_equal(got, x.astype(dst))


def test_tpu_step_casts_each_layer_inside_the_loop(monkeypatch):
  """Compiled for a v5p-8 slice with bf16 compute: no bf16 copy of the stacked [layers, ...]
  weights is made outside the layer loops. With `astype`, libtpu hoists seven such converts out of
  this tiny model's loops (and 3.3 GiB of them per chip out of the 8B step's)."""
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  pytest.importorskip('libtpu')
  from lm.bench import plan as plan_lib  # pylint: disable=import-outside-toplevel
  from lm.bench import targets  # pylint: disable=import-outside-toplevel
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  from lm.train.state import abstract_with_shardings  # pylint: disable=import-outside-toplevel

  c = tiny_config()
  c.mesh.shape.update(data=1, fsdp=-1)
  c.model.update(compute_dtype='bfloat16', remat='full')
  trainer = Trainer(c, devices=targets.parse('v5p-8').devices())
  state = abstract_with_shardings(trainer.abstract_state, trainer.shardings)
  hlo = trainer.step.lower(state, plan_lib.abstract_batch(c, trainer.batch_sharding)).compile().as_text()
  entry = hlo[hlo.index('\nENTRY'):]
  stacked_casts = re.findall(rf'= bf16\[{c.model.n_layers},[^\n=]*\bconvert\(', entry)
  assert 'while(' in entry and not stacked_casts
