"""lm.model.attention.xla_attention: causal self-attention in query blocks equals the whole logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model import attention as attention_lib

B, H, G, K = 2, 4, 2, 16


def _inputs(T, seed=0, packed=False):
  r = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(r.standard_normal((B, T, n, K), np.float32)) for n in (H, G, G))
  seg = np.ones((B, T), np.int32)
  if packed:  # three documents in row 0, padding (id 0) at the end of row 1
    seg[0, T // 3:] = 2
    seg[0, 2 * T // 3:] = 3
    seg[1, T - T // 5:] = 0
  return q, k, v, jnp.asarray(seg)


@pytest.mark.parametrize('options', [
    dict(), dict(packed=True), dict(window=40), dict(window=40, packed=True), dict(window=16),
    dict(softcap=20.0, scale=0.1, packed=True), dict(no_segments=True),
])
def test_query_blocks_give_the_whole_logits_values_and_gradients(options):
  T = 256
  options = dict(options)
  packed, no_segments = options.pop('packed', False), options.pop('no_segments', False)
  q, k, v, seg = _inputs(T, packed=packed)
  seg = None if no_segments else seg
  weights = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, H, K), np.float32))

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v, seg, causal=True, **options) * weights)

  blocked, dense = attention_lib.xla_attention, attention_lib._dense_attention  # pylint: disable=protected-access
  # Jitted: run op by op, the blocked form's many small ops each compile on their own.
  forward = lambda attend: jax.jit(lambda q, k, v: attend(q, k, v, seg, **options))(q, k, v)
  np.testing.assert_allclose(forward(blocked), forward(dense), rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(lambda *a: loss(blocked, *a), (0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(lambda *a: loss(dense, *a), (0, 1, 2)))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(w))))


def test_blocked_only_where_the_mask_allows_skipping():
  """The blocked form computes a [T/8, end] logits block per query block; the whole form one
  [T, T]. Explicit positions (cached decoding), cross-length and short sequences stay whole."""
  def logits_shapes(T, S=None, **kw):
    q, k, v, seg = _inputs(T)
    if S is not None:
      k, v = (jnp.concatenate([a, a], axis=1)[:, :S] for a in (k, v))
    hlo = jax.jit(lambda q, k, v: attention_lib.xla_attention(q, k, v, None, **kw)).lower(
        q, k, v).as_text()
    return hlo.count('stablehlo.exponential')

  assert logits_shapes(256) == attention_lib.QUERY_BLOCKS
  assert logits_shapes(64) == 1  # 8 blocks of 8 < MIN_QUERY_BLOCK
  assert logits_shapes(256, causal=False) == 1
  assert logits_shapes(256, S=320) == 1
  assert logits_shapes(256, q_positions_BT=jnp.arange(256)[None],
                       kv_positions_BS=jnp.arange(256)[None]) == 1
