"""GPU lowering: Pallas kernels in the Triton style (one program per query or key block).

Layout is the model's own [B, T, H, K]: Triton addresses strided blocks directly, so nothing is
transposed. Each program keeps its query (or key) block in registers and loops over the other
side in `fori_loop`s whose bounds skip blocks that causality or the window hides; the blocks
that are fully visible run without building a position mask.

GQA: K/V index maps send query head h to KV head lax.div(h, R). The dK/dV kernel runs one program
per KV head and loops over its R query heads, so dK/dV are accumulated in registers and
never materialised per query head.

JAX 0.11 deprecates the Pallas Triton backend (it still works there); Mosaic GPU is the
successor (see docs/attention.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from lm.model.kernels import tiles
from lm.model.kernels.tiles import NN, NT, TN, Spec


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes (powers of two for Triton). Untuned: see docs/attention.md."""
  q: int = 128
  kv: int = 64
  dq_q: int = 64  # dQ kernel: query block held, key blocks looped
  dq_kv: int = 64
  dkv_q: int = 64  # dK/dV kernel: key block held, query blocks looped
  dkv_kv: int = 64
  num_warps: int | None = None  # default: 4 for head dim <= 64, else 8
  num_stages: int = 2

  def sizes(self):
    return (self.q, self.kv, self.dq_q, self.dq_kv, self.dkv_q, self.dkv_kv)

  def fit(self, seq_len):
    """Shrinks every block to at most the (power-of-two rounded) sequence length."""
    cap = max(16, 1 << (seq_len - 1).bit_length())
    return dataclasses.replace(self, **{f: min(getattr(self, f), cap) for f in
                                         ('q', 'kv', 'dq_q', 'dq_kv', 'dkv_q', 'dkv_kv')})


def _compiler_params(blocks, head_dim, interpret):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=import-outside-toplevel
  warps = blocks.num_warps or (4 if head_dim <= 64 else 8)
  return pltriton.CompilerParams(num_warps=warps, num_stages=blocks.num_stages)


def _seg(seg_ref, start, size, column):
  if seg_ref is None:
    return None
  ids = seg_ref[pl.ds(start, size)]
  return ids.reshape(size, 1) if column else ids.reshape(1, size)


def _runs(lo, hi, full_lo, full_hi, spec):
  """Loop runs as (start, stop, spec for the mask): fully visible runs drop causal/window."""
  if not spec.causal:
    return ((lo, hi, spec),)
  no_pos = dataclasses.replace(spec, causal=False)
  return tuple((a, b, spec if masked else no_pos)
               for a, b, masked in tiles.segments(lo, hi, full_lo, full_hi))


def _fwd_kernel(q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, *, spec, bq, bk, nk):
  i = pl.program_id(0)
  q = q_ref[...]
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = _seg(qseg_ref, i * bq, bq, column=True)

  def body(j, carry, run_spec):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s, _ = tiles.logits(q, k, spec)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = tiles.visible(q_pos, k_pos, run_spec, q_seg, _seg(kseg_ref, j * bk, bk, column=False))
    return tiles.softmax_step(s, mask, *carry, v)

  carry = (jnp.full((bq, 1), -jnp.inf, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
           jnp.zeros(q.shape, jnp.float32))
  lo, hi = tiles.kv_block_range(i, bq, bk, nk, spec)
  for a, b, run_spec in _runs(lo, hi, *tiles.kv_full_range(i, bq, bk, lo, hi, spec), spec):
    carry = lax.fori_loop(a, b, functools.partial(body, run_spec=run_spec), carry)
  out, lse = tiles.finish(*carry)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse.reshape(bq)


def forward(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS, spec: Spec, blocks: Blocks, interpret):
  """Returns out [B, T, H, K] and logsumexp [B, H, T] (float32, natural log). seg_BT and
  kv_seg_BS: the queries' and the keys' segment ids (both None, or both given)."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  R = H // G
  bq, bk = blocks.q, blocks.kv
  kernel = functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nk=S // bk)
  in_specs = [
      pl.BlockSpec((None, bq, None, K), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, S, None, K), lambda i, b, h: (b, 0, lax.div(h, R), 0)),
      pl.BlockSpec((None, S, None, K), lambda i, b, h: (b, 0, lax.div(h, R), 0)),
      None if seg_BT is None else pl.BlockSpec((None, T), lambda i, b, h: (b, 0)),
      None if kv_seg_BS is None else pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
  ]
  out_specs = [
      pl.BlockSpec((None, bq, None, K), lambda i, b, h: (b, i, h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
  ]
  return pl.pallas_call(
      kernel, grid=(T // bq, B, H), in_specs=in_specs, out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct(q_BTHK.shape, q_BTHK.dtype),
                 jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
      compiler_params=_compiler_params(blocks, K, interpret), interpret=interpret,
      name='lm_flash_fwd', cost_estimate=tiles.cost_estimate(
          'fwd', q_BTHK.shape, k_BSGK.shape, spec, (q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS)),
  )(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, *,
               spec, bq, bk, nk):
  i = pl.program_id(0)
  q, do = q_ref[...], do_ref[...]
  lse = lse_ref[...].reshape(bq, 1)
  delta = delta_ref[...].reshape(bq, 1)
  q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
  q_seg = _seg(qseg_ref, i * bq, bq, column=True)

  def body(j, dq, run_spec):
    k = k_ref[pl.ds(j * bk, bk), :]
    v = v_ref[pl.ds(j * bk, bk), :]
    s, t = tiles.logits(q, k, spec)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    mask = tiles.visible(q_pos, k_pos, run_spec, q_seg, _seg(kseg_ref, j * bk, bk, column=False))
    _, ds = tiles.probs_and_dlogits(s, t, mask, lse, tiles.dot(do, v, NT), delta, spec)
    return dq + tiles.dot(ds.astype(k.dtype), k, NN)

  dq = jnp.zeros(q.shape, jnp.float32)
  lo, hi = tiles.kv_block_range(i, bq, bk, nk, spec)
  for a, b, run_spec in _runs(lo, hi, *tiles.kv_full_range(i, bq, bk, lo, hi, spec), spec):
    dq = lax.fori_loop(a, b, functools.partial(body, run_spec=run_spec), dq)
  dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref,
                *, spec, bq, bk, nq, R):
  j = pl.program_id(0)
  k, v = k_ref[...], v_ref[...]
  k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
  k_seg = _seg(kseg_ref, j * bk, bk, column=False)
  lo, hi = tiles.q_block_range(j, bk, bq, nq, spec)
  runs = _runs(lo, hi, *tiles.q_full_range(j, bk, bq, lo, hi, spec), spec)

  def head(r, carry):
    def body(i, carry, run_spec):
      dk, dv = carry
      q = q_ref[pl.ds(i * bq, bq), r, :]
      do = do_ref[pl.ds(i * bq, bq), r, :]
      lse = lse_ref[r, pl.ds(i * bq, bq)].reshape(bq, 1)
      delta = delta_ref[r, pl.ds(i * bq, bq)].reshape(bq, 1)
      s, t = tiles.logits(q, k, spec)
      q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
      mask = tiles.visible(q_pos, k_pos, run_spec, _seg(qseg_ref, i * bq, bq, column=True), k_seg)
      p, ds = tiles.probs_and_dlogits(s, t, mask, lse, tiles.dot(do, v, NT), delta, spec)
      dv = dv + tiles.dot(p.astype(do.dtype), do, TN)
      dk = dk + tiles.dot(ds.astype(q.dtype), q, TN)
      return dk, dv

    for a, b, run_spec in runs:
      carry = lax.fori_loop(a, b, functools.partial(body, run_spec=run_spec), carry)
    return carry

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, R, head, (zeros, zeros))
  dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS, o_BTHK, lse_BHT, do_BTHK, spec: Spec,
             blocks: Blocks, interpret):
  """dQ, dK, dV from the saved output and logsumexp (those of the whole attention when this is
  one block of it: ring attention passes the combined ones)."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  R = H // G
  # delta = rowsum(dO * O): one fused elementwise pass in XLA, read by both kernels.
  delta_BHT = jnp.einsum('bthk,bthk->bht', o_BTHK.astype(jnp.float32),
                         do_BTHK.astype(jnp.float32))
  params = _compiler_params(blocks, K, interpret)
  seg_spec = None if seg_BT is None else pl.BlockSpec((None, T), lambda *g: (g[1], 0))
  kv_seg_spec = None if kv_seg_BS is None else pl.BlockSpec((None, S), lambda *g: (g[1], 0))

  bq, bk = blocks.dq_q, blocks.dq_kv
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, nk=S // bk),
      grid=(T // bq, B, H),
      in_specs=[
          pl.BlockSpec((None, bq, None, K), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, S, None, K), lambda i, b, h: (b, 0, lax.div(h, R), 0)),
          pl.BlockSpec((None, S, None, K), lambda i, b, h: (b, 0, lax.div(h, R), 0)),
          pl.BlockSpec((None, bq, None, K), lambda i, b, h: (b, i, h, 0)),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
          pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
          seg_spec, kv_seg_spec,
      ],
      out_specs=pl.BlockSpec((None, bq, None, K), lambda i, b, h: (b, i, h, 0)),
      out_shape=jax.ShapeDtypeStruct(q_BTHK.shape, q_BTHK.dtype),
      compiler_params=params, interpret=interpret, name='lm_flash_dq',
      cost_estimate=tiles.cost_estimate('dq', q_BTHK.shape, k_BSGK.shape, spec,
                                        (q_BTHK, k_BSGK, v_BSGK, do_BTHK, seg_BT, kv_seg_BS)),
  )(q_BTHK, k_BSGK, v_BSGK, do_BTHK, lse_BHT, delta_BHT, seg_BT, kv_seg_BS)

  # Query-side operands grouped by KV head: [B, T, G, R, K] and [B, G, R, T] (free reshapes).
  q_BTGRK = q_BTHK.reshape(B, T, G, R, K)
  do_BTGRK = do_BTHK.reshape(B, T, G, R, K)
  lse_BGRT = lse_BHT.reshape(B, G, R, T)
  delta_BGRT = delta_BHT.reshape(B, G, R, T)
  bq, bk = blocks.dkv_q, blocks.dkv_kv
  group_spec = pl.BlockSpec((None, T, None, R, K), lambda j, b, g: (b, 0, g, 0, 0))
  stat_spec = pl.BlockSpec((None, None, R, T), lambda j, b, g: (b, g, 0, 0))
  kv_spec = pl.BlockSpec((None, bk, None, K), lambda j, b, g: (b, j, g, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nq=T // bq, R=R),
      grid=(S // bk, B, G),
      in_specs=[group_spec, kv_spec, kv_spec, group_spec, stat_spec, stat_spec, seg_spec,
                kv_seg_spec],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k_BSGK.shape, k_BSGK.dtype),
                 jax.ShapeDtypeStruct(v_BSGK.shape, v_BSGK.dtype)],
      compiler_params=params, interpret=interpret, name='lm_flash_dkv',
      cost_estimate=tiles.cost_estimate('dkv', q_BTHK.shape, k_BSGK.shape, spec,
                                        (q_BTHK, k_BSGK, v_BSGK, do_BTHK, seg_BT, kv_seg_BS)),
  )(q_BTGRK, k_BSGK, v_BSGK, do_BTGRK, lse_BGRT, delta_BGRT, seg_BT, kv_seg_BS)
  return dq, dk, dv
