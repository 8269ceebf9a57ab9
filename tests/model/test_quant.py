"""QLoRA: int8 / NF4 base weights with per-block scales (qwix), dequantized per layer in the
forward; LoRA trains on top through the one step. Checked against plain numpy quantization and
against the float model built from the dequantized weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.errors import ConfigError
from lm.model import quant
from lm.train import objectives, partition
from lm.train.loop import Trainer
from lm.train.state import ModelSpec

# The 16 NF4 code values (Dettmers et al. 2023, bitsandbytes' table).
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230723857880, 0.33791524171829224,
                0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def numpy_blockwise(w, axis, block, qtype):
  """Dequantized w: absmax per block of `block` entries along `axis`, every other axis its own."""
  moved = np.moveaxis(w, axis, -1)
  blocks = moved.reshape(*moved.shape[:-1], -1, block)
  absmax = np.abs(blocks).max(-1, keepdims=True)
  if qtype == 'int8':
    scale = absmax / 127.5  # qwix's symmetric bound: the 127 bucket spans [126.5, 127.5)
    # w * (1 / scale) as qwix computes it, in float32: a block's absmax lands on exactly -128 or 127.5.
    inverse = (np.float32(127.5) / absmax.astype(np.float32)).astype(np.float32)
    out = np.clip(np.round(blocks * inverse), -128, 127) * scale
  else:
    idx = np.abs(blocks[..., None] / absmax[..., None] - NF4).argmin(-1)
    out = NF4[idx] * absmax
  return np.moveaxis(out.reshape(moved.shape), -1, axis)


@pytest.mark.parametrize('qtype', ['int8', 'nf4'])
def test_blockwise_quantization_matches_numpy(qtype):
  w = np.random.default_rng(0).normal(size=(2, 64, 3, 5)).astype(np.float32)
  values, scales = quant.quantize(jnp.asarray(w), qtype, block=16, n_in=1)
  assert scales.shape == (2, 4, 3, 5) == quant.scale_shape(w.shape, 1, 16)
  assert values.dtype == (jnp.int8 if qtype == 'int8' else jnp.uint4)
  ours = np.asarray(quant.as_array(quant.quantized_array(values, scales, qtype)))
  want = numpy_blockwise(w, 1, 16, qtype)
  # A block's absmax sits exactly on int8's half-step bound (127.5 steps), where the rounding of
  # the last float bit decides between -128 and -127; every other entry must agree exactly.
  absmax = np.abs(w) == np.repeat(np.abs(w).reshape(2, 4, 16, 3, 5).max(2), 16, axis=1)
  np.testing.assert_allclose(ours[~absmax], want[~absmax], rtol=1e-5, atol=1e-6)
  step = np.repeat(np.asarray(scales), 16, axis=1)
  assert np.all(np.abs(ours - w)[absmax] <= step[absmax] * 0.51 + 1e-6)
  assert quant.storage_bytes(values, scales) == w.size * (1 if qtype == 'int8' else 0.5) + scales.size * 4


def qlora_config(qtype='nf4'):
  c = tiny_config(d_model=64, mlp_dim=128)
  c.data.update(batch_size=4, seq_len=16)
  c.model.quant.update(type=qtype, block=32)
  c.model.lora.update(rank=4, alpha=8.0)
  c.train.trainable = 'lora'
  return c


@pytest.mark.parametrize('qtype', ['int8', 'nf4'])
def test_qlora_loss_and_adapter_gradient_equal_the_dequantized_float_model(qtype):
  c = qlora_config(qtype)
  spec, float_spec = ModelSpec(c.model), ModelSpec(quant.without_quant(c.model))
  params = jax.jit(spec.init)(jax.random.key(0))
  assert set(spec.quantized) == {f'layers.{m}.kernel' for m in
                                 ('attn.q', 'attn.k', 'attn.v', 'attn.o', 'mlp.gate', 'mlp.up', 'mlp.down')}
  # The plain reference: a float model whose kernels are the dequantized values.
  dequantized = {n: v for n, v in params.items() if not n.endswith(quant.SCALE_SUFFIX)}
  for n in spec.quantized:
    dequantized[n] = quant.as_array(quant.quantized_array(params[n], params[n + '_scale'], qtype))
  rng = np.random.default_rng(1)
  lora = {n: jnp.asarray(rng.normal(size=v.shape) * 0.1, v.dtype)
          for n, v in params.items() if partition.is_adapter(n)}
  batch = random_batch(c)

  def loss(spec_, base, adapters):
    total, n, _ = objectives.next_token_xent(spec_.bind({**base, **adapters}), batch)
    return total / n

  ours, ours_grad = jax.jit(jax.value_and_grad(lambda a: loss(spec, params, a)))(lora)
  want, want_grad = jax.jit(jax.value_and_grad(lambda a: loss(float_spec, dequantized, a)))(lora)
  np.testing.assert_allclose(ours, want, rtol=1e-6)
  for n in lora:
    np.testing.assert_allclose(ours_grad[n], want_grad[n], rtol=1e-4, atol=1e-6)


def test_qlora_trains_adapters_only_and_refuses_to_train_the_base():
  c = qlora_config('nf4')
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  frozen = {n: np.asarray(jax.device_get(state.params[n])) for n in trainer.spec.quantized}
  batch = trainer.global_batch(random_batch(c))
  losses = []
  for _ in range(5):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  for n, v in frozen.items():
    assert state.params[n].dtype == jnp.uint4
    np.testing.assert_array_equal(np.asarray(jax.device_get(state.params[n])), v)
  c.train.trainable = 'all'
  with pytest.raises(ConfigError, match='stores the base weights quantized and frozen'):
    Trainer(c, devices=jax.devices()[:1])
