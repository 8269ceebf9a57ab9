"""Flash attention (lm.model.kernels) against the XLA reference, on CPU in Pallas interpret mode.

Both lowerings run here: the GPU (Triton-style) and TPU (Mosaic) kernels, with small blocks so
that every case spans several query and key blocks of unequal size. Hardware lowering is
checked separately by lowering (not running) for 'tpu' and 'cuda'.

Tolerances (max abs error vs the float32 XLA reference on the same inputs; gradients are
divided by the largest reference gradient entry):
  float32:  output 1e-5, gradients 1e-5  (f32 accumulation, no TF32; only summation order
            differs: observed <= 1.4e-6)
  bfloat16: output 2e-2, gradients 1e-2  (P and dS are rounded to bf16 before their matmuls,
            as the XLA reference rounds P: observed <= 8.3e-3 and 4.0e-3); and no worse than
            2x the bf16 XLA reference's own error against float32.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.model import attention as attention_lib
from lm.model.attention import xla_attention
from lm.model import ring_attention
from lm.model.kernels import block_backward, block_forward, flash_attention, flash_gpu, flash_tpu, tiles

SMALL = dict(q=64, kv=32, dq_q=32, dq_kv=64, dkv_q=64, dkv_kv=32)
BLOCKS = {'gpu': flash_gpu.Blocks(**SMALL), 'tpu': flash_tpu.Blocks(**SMALL)}
TOL = {jnp.float32: (1e-5, 1e-5), jnp.bfloat16: (2e-2, 1e-2)}


def packed_segments(B, T, lengths, pad):
  """Rows of documents with ids 1, 2, ... of the given lengths, then `pad` tokens of id 0."""
  row = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])
  assert row.size == T
  return jnp.asarray(np.broadcast_to(row, (B, T)), jnp.int32)


def inputs(B, T, H, G, K, dtype, seed=0):
  kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (B, T, H, K), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (B, T, G, K), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (B, T, G, K), jnp.float32).astype(dtype)
  cotangent = jax.random.normal(kc, (B, T, H, K), jnp.float32)
  return q, k, v, cotangent


def value_and_grads(fn):
  """A compiled (q, k, v, cotangent) -> f32 (output, dq, dk, dv)."""
  @jax.jit
  def run(q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return tuple(x.astype(jnp.float32) for x in (out, *vjp(cotangent.astype(out.dtype))))
  return run


def errors(got, want):
  out_err = float(jnp.max(jnp.abs(got[0] - want[0])))
  grad_errs = [float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) for g, w in zip(got[1:], want[1:])]
  return out_err, max(grad_errs)


# (name, B, T, H, G, K, dtype, segment layout, options). Segment layouts: None, or
# (document lengths, trailing padding); T not a multiple of 64 exercises padding.
CASES = [
    ('mha64', 1, 256, 2, 2, 64, jnp.float32, None, {}),
    ('gqa2_128_packed', 2, 256, 4, 2, 128, jnp.float32, ((100, 60, 66), 30), {}),
    ('gqa4_window_packed', 1, 192, 4, 1, 64, jnp.float32, ((70, 122), 0), dict(window=48)),
    ('softcap128', 1, 256, 2, 1, 128, jnp.float32, ((128, 128), 0), dict(softcap=20.0)),
    ('noncausal_padded_T200', 1, 200, 2, 1, 64, jnp.float32, ((90, 80), 30), dict(causal=False)),
    ('bf16_gqa4_128_window', 1, 256, 4, 1, 128, jnp.bfloat16, ((150, 90), 16), dict(window=64)),
    ('bf16_T130', 2, 130, 2, 2, 64, jnp.bfloat16, None, {}),
]


@pytest.mark.parametrize('lowering', ['gpu', 'tpu'])
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_matches_reference(lowering, case):
  _, B, T, H, G, K, dtype, layout, options = case
  q, k, v, cotangent = inputs(B, T, H, G, K, dtype)
  seg = None if layout is None else packed_segments(B, T, *layout)

  def flash(q, k, v):
    return flash_attention(q, k, v, seg, lowering=lowering, blocks=BLOCKS[lowering],
                           interpret=True, **options)

  def reference(q, k, v):
    return xla_attention(q, k, v, seg, **options)

  f32 = [x.astype(jnp.float32) for x in (q, k, v)]
  want = value_and_grads(reference)(*f32, cotangent)
  got = value_and_grads(flash)(q, k, v, cotangent)
  assert got[0].shape == (B, T, H, K)
  out_err, grad_err = errors(got, want)
  out_tol, grad_tol = TOL[dtype]
  print(f'{lowering} {case[0]}: output {out_err:.1e}, gradients {grad_err:.1e}')
  assert out_err < out_tol and grad_err < grad_tol, (out_err, grad_err)
  if dtype == jnp.bfloat16:  # and not worse than XLA itself in bf16
    xla_out_err, xla_grad_err = errors(value_and_grads(reference)(q, k, v, cotangent), want)
    assert out_err <= 2 * xla_out_err + 1e-3 and grad_err <= 2 * xla_grad_err + 1e-3


@pytest.mark.parametrize('lowering', ['gpu', 'tpu'])
def test_a_block_of_ring_attention_matches_the_xla_block(lowering):
  """Ring attention's block (lm/model/ring_attention.py): 64 queries against 128 keys, each side
  with its own segment ids, not causal; the output, the logsumexp (-inf where a row sees no key:
  the queries of the last document) and the gradients from the given logsumexp."""
  q, k, v, cotangent = inputs(1, 128, 4, 2, 16, jnp.float32)
  kv_seg = packed_segments(1, 128, (40, 48, 24), 16)
  q, cotangent = q[:, 64:], cotangent[:, 64:]
  seg = jnp.where(kv_seg[:, 64:] == 3, 4, kv_seg[:, 64:])  # document 3's queries: 4, no key's id
  options = dict(softcap=20.0, lowering=lowering, blocks=BLOCKS[lowering])

  @jax.jit
  def both(q, k, v, seg, kv_seg, cotangent):
    out, lse = block_forward(q, k, v, seg, kv_seg, **options)
    grads = block_backward(q, k, v, seg, kv_seg, out, lse, cotangent, **options)
    ref_out, ref_lse = ring_attention.xla_block_forward(q, k, v, seg, kv_seg, softcap=20.0)
    ref_grads = ring_attention.xla_block_backward(q, k, v, seg, kv_seg, ref_out, ref_lse,
                                                  cotangent, softcap=20.0)
    return (out, lse, *grads), (ref_out, ref_lse, *ref_grads)

  got, want = both(q, k, v, seg, kv_seg, cotangent)
  assert bool(jnp.any(jnp.isneginf(want[1]))) and bool(jnp.all(jnp.isfinite(want[1][..., :8])))
  np.testing.assert_array_equal(jnp.isneginf(got[1]), jnp.isneginf(want[1]))
  for g, w in zip(got, want):
    finite = lambda x, w=w: jnp.where(jnp.isneginf(w), 0.0, x)
    np.testing.assert_allclose(finite(g), finite(w), atol=2e-6, rtol=1e-5)


def test_documents_do_not_interact():
  """Changing one packed document leaves the other's outputs and gradients unchanged."""
  B, T, H, G, K = 1, 128, 2, 1, 64
  q, k, v, cotangent = inputs(B, T, H, G, K, jnp.float32)
  seg = packed_segments(B, T, (64, 64), 0)
  q2 = q.at[:, 64:].set(jax.random.normal(jax.random.key(9), (B, 64, H, K)))
  run = value_and_grads(
      lambda q, k, v: flash_attention(q, k, v, seg, lowering='tpu', blocks=BLOCKS['tpu'],
                                      interpret=True))
  a, b = run(q, k, v, cotangent), run(q2, k, v, cotangent)
  np.testing.assert_array_equal(a[0][:, :64], b[0][:, :64])
  np.testing.assert_array_equal(a[2][:, :64], b[2][:, :64])  # dK of document 1
  assert not np.allclose(a[0][:, 64:], b[0][:, 64:])


def brute_force_ranges(n_rows, n_cols, row_block, col_block, spec, transpose):
  """Visible and fully visible block ranges from the dense position mask."""
  t = np.arange(n_rows)[:, None] if not transpose else np.arange(n_cols)[None, :]
  s = np.arange(n_cols)[None, :] if not transpose else np.arange(n_rows)[:, None]
  mask = np.ones((n_rows, n_cols), bool) if not spec.causal else (s <= t)
  if spec.causal and spec.window:
    mask &= t - s < spec.window
  blocks = mask.reshape(n_rows // row_block, row_block, n_cols // col_block, col_block)
  return blocks.any(axis=(1, 3)), blocks.all(axis=(1, 3))


@pytest.mark.parametrize('bq,bk', [(64, 32), (32, 64), (32, 32)])
@pytest.mark.parametrize('window', [None, 1, 40, 64, 100])
def test_block_ranges(bq, bk, window):
  """Block skipping never drops a visible block, and mask-free runs are truly fully visible."""
  T = 256
  spec = tiles.Spec(causal=True, window=window)
  any_qk, all_qk = brute_force_ranges(T, T, bq, bk, spec, transpose=False)
  for i in range(T // bq):
    lo, hi = (int(x) for x in tiles.kv_block_range(i, bq, bk, T // bk, spec))
    full_lo, full_hi = (int(x) for x in tiles.kv_full_range(i, bq, bk, lo, hi, spec))
    assert lo <= full_lo <= full_hi <= hi
    assert set(np.flatnonzero(any_qk[i])) <= set(range(lo, hi))
    assert all(all_qk[i, j] for j in range(full_lo, full_hi))
  for j in range(T // bk):
    lo, hi = (int(x) for x in tiles.q_block_range(j, bk, bq, T // bq, spec))
    full_lo, full_hi = (int(x) for x in tiles.q_full_range(j, bk, bq, lo, hi, spec))
    assert lo <= full_lo <= full_hi <= hi
    assert set(np.flatnonzero(any_qk[:, j])) <= set(range(lo, hi))
    assert all(all_qk[i, j] for i in range(full_lo, full_hi))


@pytest.mark.parametrize('platform,lowering', [('tpu', 'tpu'), ('cuda', 'gpu')])
def test_lowers_for_hardware(platform, lowering):
  """Forward and backward lower to Mosaic TPU / Triton with default blocks (not run here)."""
  q = jax.ShapeDtypeStruct((2, 1024, 8, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1024, 2, 128), jnp.bfloat16)
  seg = jax.ShapeDtypeStruct((2, 1024), jnp.int32)

  def loss(q, k, v, seg):
    out = flash_attention(q, k, v, seg, window=256, softcap=30.0, lowering=lowering,
                          interpret=False)
    return out.astype(jnp.float32).sum()

  lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, seg).lower(
      lowering_platforms=(platform,))
  text = lowered.as_text()
  for name in ('lm_flash_fwd', 'lm_flash_dq', 'lm_flash_dkv'):
    assert name in text


def test_dispatch_on_cpu():
  q, k, v, _ = inputs(1, 64, 2, 1, 64, jnp.float32)
  seg = packed_segments(1, 64, (40, 24), 0)
  want = xla_attention(q, k, v, seg)
  assert attention_lib.choose_implementation(q, k) == 'xla'  # CPU: interpret mode is slow
  np.testing.assert_array_equal(attention_lib.attention(q, k, v, seg), want)
  # cuDNN takes no segment ids; on CPU the documented fallback ends at the reference.
  np.testing.assert_array_equal(attention_lib.attention(q, k, v, seg, implementation='cudnn'),
                                want)
  got = attention_lib.attention(q, k, v, seg, implementation='pallas')
  np.testing.assert_allclose(got, want, atol=2e-5)
  with pytest.raises(ValueError, match='q_positions'):
    attention_lib.attention(q, k, v, seg, implementation='pallas', q_positions_BT=seg)


def test_rejects_cross_attention():
  q, k, v, _ = inputs(1, 64, 2, 1, 64, jnp.float32)
  with pytest.raises(ValueError, match='self-attention'):
    flash_attention(q, k[:, :32], v[:, :32])


def test_case_coverage():
  """The matrix covers the axes the issue asks for."""
  head_dims = {c[5] for c in CASES}
  ratios = {c[3] // c[4] for c in CASES}
  dtypes = {c[6] for c in CASES}
  assert head_dims == {64, 128} and ratios == {1, 2, 4} and len(dtypes) == 2
  assert any(c[2] % 64 for c in CASES) and any('window' in c[8] for c in CASES)
  assert any(c[7] and c[7][1] for c in CASES)  # padding with id 0
