"""lm.model.contract: tensordot's values and gradients, with the weight gradient in x's order."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model.contract import contract, lora_contract


@pytest.mark.parametrize('x_shape,w_shape,n_in', [
    ((2, 5, 6), (6, 7), 1),          # q/k/v/gate/up/down: [B, T, D] · [D, F]
    ((2, 5, 3, 4), (3, 4, 6), 2),    # attention out: [B, T, H, K] · [H, K, D]
    ((2, 5, 6), (6, 3, 4), 1),       # q: [B, T, D] · [D, H, K]
    ((7, 6), (6, 5), 1),             # plain matrices
])
def test_values_and_gradients_equal_tensordot(x_shape, w_shape, n_in):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  out_shape = x_shape[:len(x_shape) - n_in] + w_shape[n_in:]
  probe = jax.random.normal(kg, out_shape)
  ours = lambda x, w: jnp.sum(jnp.sin(contract(x, w, n_in)) * probe)
  reference = lambda x, w: jnp.sum(jnp.sin(jnp.tensordot(x, w, n_in)) * probe)
  np.testing.assert_allclose(contract(x, w, n_in), jnp.tensordot(x, w, n_in), rtol=1e-6, atol=1e-6)
  for got, want in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(reference, (0, 1))(x, w)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('x_shape,w_shape,rank,n_in', [
    ((2, 5, 6), (6, 7), 3, 1),
    ((2, 5, 3, 4), (3, 4, 6), 2, 2),
    ((2, 5, 6), (6, 3, 4), 2, 1),
])
def test_lora_contract_equals_the_adapter_beside_the_base(x_shape, w_shape, rank, n_in):
  """x · (W + A·B) with its own VJP against x · W + (x · A) · B differentiated by jax."""
  kx, kw, ka, kb, kg = jax.random.split(jax.random.key(1), 5)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  a = jax.random.normal(ka, w_shape[:n_in] + (rank,))
  b = jax.random.normal(kb, (rank,) + w_shape[n_in:])
  probe = jax.random.normal(kg, x_shape[:len(x_shape) - n_in] + w_shape[n_in:])
  ours = lambda *p: jnp.sum(jnp.sin(lora_contract(*p, n_in)) * probe)
  reference = lambda x, w, a, b: jnp.sum(jnp.sin(
      jnp.tensordot(x, w, n_in) + jnp.tensordot(jnp.tensordot(x, a, n_in), b, 1)) * probe)
  np.testing.assert_allclose(ours(x, w, a, b), reference(x, w, a, b), rtol=1e-5)
  for got, want in zip(jax.grad(ours, (0, 1, 2, 3))(x, w, a, b),
                       jax.grad(reference, (0, 1, 2, 3))(x, w, a, b)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_lora_contract_with_zero_b_is_exactly_the_base_layer():
  x, w = jax.random.normal(jax.random.key(2), (4, 6)), jax.random.normal(jax.random.key(3), (6, 5))
  a, b = jnp.ones((6, 2)), jnp.zeros((2, 5))
  np.testing.assert_array_equal(lora_contract(x, w, a, b, 1), contract(x, w, 1))


def test_bfloat16_gradients_keep_their_dtypes():
  x = jnp.ones((4, 8), jnp.bfloat16)
  w = jnp.ones((8, 3), jnp.bfloat16)
  dx, dw = jax.grad(lambda x, w: jnp.sum(contract(x, w, 1).astype(jnp.float32)), (0, 1))(x, w)
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dw, np.float32), np.full((8, 3), 4.0))


def _transposed_activation_gradients(matmul):
  """How many instructions of the compiled CPU gradient write a [B*T, F] activation gradient
  transposed, as [F, B*T]: a scanned stack of gated layers, x [B, T, D] · W [D, F] as in
  lm.model.transformer.MLP (the F -> D projection is a constant here, so the only [*, F] weight
  gradients are the gate's and the up projection's, whose x is D wide)."""
  B, T, D, F, L = 4, 64, 32, 96, 2
  x, down = jnp.ones((B, T, D)), jnp.ones((F, D)) / F
  gates, ups = jnp.ones((L, D, F)), jnp.ones((L, D, F))

  def loss(gates, ups):
    def layer(h, weights):
      gate, up = weights
      return h + jnp.tensordot(jax.nn.silu(matmul(h, gate)) * matmul(h, up), down, 1), None
    h, _ = jax.lax.scan(layer, x, (gates, ups))
    return jnp.sum(h * h)

  hlo = jax.jit(jax.grad(loss, (0, 1))).lower(gates, ups).compile().as_text()
  return len(re.findall(rf'= f32\[{F},{B * T}\]', hlo))


def test_cpu_weight_gradient_transposes_the_input_not_the_activation_gradient():
  if jax.default_backend() != 'cpu':
    pytest.skip("the layout question is XLA CPU's")
  plain = _transposed_activation_gradients(lambda x, w: jnp.tensordot(x, w, 1))
  assert plain > 0, 'tensordot no longer makes XLA transpose the activation gradient: is contract still needed?'
  assert _transposed_activation_gradients(lambda x, w: contract(x, w, 1)) == 0
