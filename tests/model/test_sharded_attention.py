"""Pallas attention inside a mesh: shard_map over batch (data, fsdp) and heads (tensor), on 8 CPU
devices in interpret mode, equal to the XLA reference forward and backward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lm.model import attention as attention_lib
from test_kernels import errors, inputs, packed_segments


def mesh_of(data, fsdp, tensor):
  return Mesh(np.asarray(jax.devices()[:data * fsdp * tensor]).reshape(data, fsdp, tensor),
              ('data', 'fsdp', 'tensor'))


def sharded_value_and_grads(mesh, implementation, kv_heads, **kwargs):
  """(q, k, v, seg, cotangent) -> f32 (out, dq, dk, dv), jitted with `mesh` in context and the
  inputs split over batch and heads as the model's activations are."""
  def run(q, k, v, seg, cotangent):
    fn = lambda q, k, v: attention_lib.attention(q, k, v, seg, implementation=implementation, **kwargs)
    out, vjp = jax.vjp(fn, q, k, v)
    return tuple(x.astype(jnp.float32) for x in (out, *vjp(cotangent.astype(out.dtype))))
  heads = NamedSharding(mesh, P(('data', 'fsdp'), None, 'tensor'))
  kv = heads if kv_heads % mesh.shape['tensor'] == 0 else NamedSharding(mesh, P(('data', 'fsdp')))
  rows = NamedSharding(mesh, P(('data', 'fsdp')))
  jitted = jax.jit(run, in_shardings=(heads, kv, kv, rows, heads))

  def call(*args):
    with jax.set_mesh(mesh):
      return jitted(*args)
  return call


CASES = {  # name: (B, T, H, G, K, documents per row, window, mesh (data, fsdp, tensor))
    'gqa_segments': (4, 32, 4, 2, 16, (20, 12), None, (2, 2, 2)),
    'window_segments': (4, 32, 4, 2, 16, (10, 15, 7), 8, (4, 1, 2)),
    'heads_stay_whole': (2, 32, 4, 1, 16, None, None, (1, 2, 4)),  # 1 KV head: no head split
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_sharded_pallas_equals_the_reference(case):
  B, T, H, G, K, docs, window, shape = CASES[case]
  mesh = mesh_of(*shape)
  q, k, v, cotangent = inputs(B, T, H, G, K, jnp.float32)
  seg = packed_segments(B, T, docs, 0) if docs else jnp.ones((B, T), jnp.int32)
  got = sharded_value_and_grads(mesh, 'pallas', G, window=window)(q, k, v, seg, cotangent)
  want = sharded_value_and_grads(mesh, 'xla', G, window=window)(q, k, v, seg, cotangent)
  out_err, grad_err = errors(got, want)
  assert out_err < 1e-5 and grad_err < 1e-5, (out_err, grad_err)


def test_auto_takes_the_kernel_only_where_a_mesh_can_hold_it():
  q = jax.ShapeDtypeStruct((8, 256, 4, 64), jnp.bfloat16)
  with jax.set_mesh(mesh_of(2, 2, 2)):  # CPU devices: the reference (interpret mode is slow)
    assert attention_lib.target() == ('cpu', 8)
    assert attention_lib.choose_implementation(q, q) == 'xla'
  assert attention_lib.target() == ('cpu', 8)  # no mesh in context: several devices, no shard_map


def test_the_sharded_kernel_is_a_shard_map_of_the_pallas_call():
  mesh = mesh_of(2, 2, 2)
  q, k, v, _ = inputs(4, 64, 4, 2, 16, jnp.float32)
  seg = jnp.ones((4, 64), jnp.int32)
  with jax.set_mesh(mesh):
    text = str(jax.make_jaxpr(lambda q, k, v: attention_lib.attention(
        q, k, v, seg, implementation='pallas'))(q, k, v))
  assert 'shard_map' in text and 'pallas_call' in text
