"""The Pallas kernels compile for real targets from this CPU host: Mosaic for a TPU chip (libtpu)
and Triton for an H100 (the CUDA plugin with its GpuTargetConfig), forward and backward, at small
shapes, so a kernel that cannot lower or compile fails CI. Nothing runs: there is no hardware."""

import time

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

from lm.bench import targets
from lm.model.kernels import flash_attention


@pytest.mark.parametrize('target,lowering', [('v5e-1', 'tpu'), ('h100x1', 'gpu')])
def test_flash_attention_compiles_for_the_target(target, lowering):
  device = targets.parse(target).devices()[0]
  at = SingleDeviceSharding(device)
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16, sharding=at)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16, sharding=at)
  seg = jax.ShapeDtypeStruct((1, 256), jnp.int32, sharding=at)

  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, seg, window=128, lowering=lowering, interpret=False)
    return out.astype(jnp.float32).sum()

  start = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, seg)
  text = lowered.as_text()
  compiled = lowered.compile()
  print(f'{target}: compiled flash forward + backward in {time.perf_counter() - start:.1f}s')
  for name in ('lm_flash_fwd', 'lm_flash_dq', 'lm_flash_dkv'):
    assert name in text
  out_shapes = jax.tree.map(lambda x: x.shape, compiled.out_info)
  assert out_shapes == ((), ((1, 256, 4, 128), (1, 256, 2, 128), (1, 256, 2, 128)))


def test_the_cost_estimate_reaches_the_tpu_compiler():
  """Causal, 1 x 256 tokens, 4 heads of 128: 256·257/2 visible pairs per head, QKᵀ and PV at 2
  FLOPs per multiply-add: 2·2·4·32896·128 FLOPs, one exp per pair (XLA schedules around it)."""
  q = jax.ShapeDtypeStruct((1, 256, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, 256, 2, 128), jnp.bfloat16)
  text = jax.jit(lambda q, k, v: flash_attention(q, k, v, lowering='tpu', interpret=False)).trace(
      q, kv, kv).lower(lowering_platforms=('tpu',)).as_text()
  assert f'\\22flops\\22:{2 * 2 * 4 * 32896 * 128},' in text
  assert f'\\22transcendentals\\22:{4 * 32896}' in text
