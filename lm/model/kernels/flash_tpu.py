"""TPU lowering: Pallas Mosaic kernels with the reduction as the innermost grid axis.

Mosaic pipelines HBM->VMEM copies of each grid step's blocks, so the loop over the other
sequence side is a grid axis ('arbitrary') with running statistics in VMEM scratch, rather
than an in-kernel loop. Blocks that causality or the window hide are skipped with
`pl.when`, and their index maps are clamped to a visible block so no new copy is issued.

Layout: heads before sequence ([B, H, T, K]) so every block's two minor dims are
(sequence block, head dim) as Mosaic's (8, 128) tiling wants. Per-row statistics are stored
as [B, H, 1, T] rows; segment ids come twice, lane-broadcast as columns [B, T, 128] and
sublane-broadcast as rows [B, 8, T] (the layout jax's own TPU kernels use).

The dK/dV kernel works on logits^T ([key block, query block]) so that logsumexp and delta
are rows, and its grid walks the R query heads of one KV head (GQA) before writing dK/dV.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lm.model.kernels import tiles
from lm.model.kernels.tiles import NN, NT, Spec

LANES, SUBLANES = 128, 8


@dataclasses.dataclass(frozen=True)
class Blocks:
  """Tile sizes; multiples of 128 on hardware (any size works in interpret mode)."""
  q: int = 512
  kv: int = 512
  dq_q: int = 256
  dq_kv: int = 256
  dkv_q: int = 256
  dkv_kv: int = 256

  def sizes(self):
    return (self.q, self.kv, self.dq_q, self.dq_kv, self.dkv_q, self.dkv_kv)

  def fit(self, seq_len):
    cap = max(LANES, -(-seq_len // LANES) * LANES)
    cap = 1 << (cap - 1).bit_length()  # power of two, so every block divides the largest
    return dataclasses.replace(self, **{f: min(getattr(self, f), cap) for f in
                                         ('q', 'kv', 'dq_q', 'dq_kv', 'dkv_q', 'dkv_kv')})


def _params(*semantics):
  return pltpu.CompilerParams(dimension_semantics=semantics)


def _seg_layouts(column_ids_BT, row_ids_BS):
  """The ids of the tile's rows lane-broadcast [B, T, 128] and of its columns sublane-broadcast
  [B, 8, S] (queries and keys in the forward and dQ kernels; keys and queries in dK/dV)."""
  if column_ids_BT is None:
    return None, None
  B, T = column_ids_BT.shape
  S = row_ids_BS.shape[1]
  return (jnp.broadcast_to(column_ids_BT[:, :, None], (B, T, LANES)),
          jnp.broadcast_to(row_ids_BS[:, None, :], (B, SUBLANES, S)))


def _clamp(idx, lo, hi):
  # Skipped steps re-point at a visible block, so Mosaic issues no copy for them.
  return jnp.clip(idx, lo, hi - 1)


def _fwd_kernel(q_ref, k_ref, v_ref, segc_ref, segr_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                spec, bq, bk, nk):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  lo, hi = tiles.kv_block_range(i, bq, bk, nk, spec)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    s, _ = tiles.logits(q_ref[...], k_ref[...], spec)
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    segs = () if segc_ref is None else (segc_ref[:, :1], segr_ref[:1, :])
    mask = tiles.visible(q_pos, k_pos, spec, *segs)
    m, l, acc = tiles.softmax_step(s, mask, m_sc[:, :1], l_sc[:, :1], acc_sc[...], v_ref[...])
    m_sc[...] = jnp.broadcast_to(m, m_sc.shape)
    l_sc[...] = jnp.broadcast_to(l, l_sc.shape)
    acc_sc[...] = acc

  @pl.when(j == nk - 1)
  def _store():
    out, lse = tiles.finish(m_sc[:, :1], l_sc[:, :1], acc_sc[...])
    o_ref[...] = out.astype(o_ref.dtype)
    # [bq, 128] -> [128, bq]: the logsumexp column becomes a lane-major row.
    lse_ref[...] = jnp.transpose(jnp.broadcast_to(lse, (bq, LANES)))[:1]


def _to_bhtk(x_BTHK):
  return jnp.swapaxes(x_BTHK, 1, 2)


def forward(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS, spec: Spec, blocks: Blocks, interpret):
  """Returns out [B, T, H, K] and logsumexp [B, H, T] (float32, natural log). seg_BT and
  kv_seg_BS: the queries' and the keys' segment ids (both None, or both given)."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  R = H // G
  bq, bk = blocks.q, blocks.kv
  nk = S // bk
  segc, segr = _seg_layouts(seg_BT, kv_seg_BS)

  def kv_block(i, j):
    return _clamp(j, *tiles.kv_block_range(i, bq, bk, nk, spec))

  in_specs = [
      pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0)),
      pl.BlockSpec((None, None, bk, K), lambda b, h, i, j: (b, lax.div(h, R), kv_block(i, j), 0)),
      pl.BlockSpec((None, None, bk, K), lambda b, h, i, j: (b, lax.div(h, R), kv_block(i, j), 0)),
      None if segc is None else pl.BlockSpec((None, bq, LANES), lambda b, h, i, j: (b, i, 0)),
      None if segr is None else pl.BlockSpec((None, SUBLANES, bk),
                                             lambda b, h, i, j: (b, 0, kv_block(i, j))),
  ]
  out_specs = [
      pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0)),
      pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i)),
  ]
  out_BHTK, lse_BH1T = pl.pallas_call(
      functools.partial(_fwd_kernel, spec=spec, bq=bq, bk=bk, nk=nk),
      grid=(B, H, T // bq, nk), in_specs=in_specs, out_specs=out_specs,
      out_shape=[jax.ShapeDtypeStruct((B, H, T, K), q_BTHK.dtype),
                 jax.ShapeDtypeStruct((B, H, 1, T), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                      pltpu.VMEM((bq, K), jnp.float32)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=interpret, name='lm_flash_fwd', cost_estimate=tiles.cost_estimate(
          'fwd', q_BTHK.shape, k_BSGK.shape, spec, (q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS)),
  )(_to_bhtk(q_BTHK), _to_bhtk(k_BSGK), _to_bhtk(v_BSGK), segc, segr)
  return _to_bhtk(out_BHTK), lse_BH1T[:, :, 0]


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segc_ref, segr_ref, dq_ref, dq_sc,
               *, spec, bq, bk, nk):
  i, j = pl.program_id(2), pl.program_id(3)

  @pl.when(j == 0)
  def _init():
    dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

  lo, hi = tiles.kv_block_range(i, bq, bk, nk, spec)

  @pl.when((j >= lo) & (j < hi))
  def _step():
    k = k_ref[...]
    s, t = tiles.logits(q_ref[...], k, spec)
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    segs = () if segc_ref is None else (segc_ref[:, :1], segr_ref[:1, :])
    mask = tiles.visible(q_pos, k_pos, spec, *segs)
    lse = jnp.expand_dims(lse_ref[0], -1)  # row -> column, as jax's splash kernel does
    delta = jnp.expand_dims(delta_ref[0], -1)
    dp = tiles.dot(do_ref[...], v_ref[...], NT)
    _, ds = tiles.probs_and_dlogits(s, t, mask, lse, dp, delta, spec)
    dq_sc[...] += tiles.dot(ds.astype(k.dtype), k, NN)

  @pl.when(j == nk - 1)
  def _store():
    dq_ref[...] = (dq_sc[...] * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, segc_ref, segr_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, spec, bq, bk, nq, R):
  j, r, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

  @pl.when((r == 0) & (i == 0))
  def _init():
    dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
    dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

  lo, hi = tiles.q_block_range(j, bk, bq, nq, spec)

  @pl.when((i >= lo) & (i < hi))
  def _step():
    q, do = q_ref[...], do_ref[...]
    s, t = tiles.logits(k_ref[...], q, spec)  # transposed: [bk, bq]
    k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (bk, bq), 0)
    q_pos = i * bq + lax.broadcasted_iota(jnp.int32, (bk, bq), 1)
    segs = () if segc_ref is None else (segr_ref[:1, :], segc_ref[:, :1])
    mask = tiles.visible(q_pos, k_pos, spec, *segs)
    dp = tiles.dot(v_ref[...], do, NT)
    p, ds = tiles.probs_and_dlogits(s, t, mask, lse_ref[...], dp, delta_ref[...], spec)
    dv_sc[...] += tiles.dot(p.astype(do.dtype), do, NN)
    dk_sc[...] += tiles.dot(ds.astype(q.dtype), q, NN)

  @pl.when((r == R - 1) & (i == nq - 1))
  def _store():
    dk_ref[...] = (dk_sc[...] * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS, o_BTHK, lse_BHT, do_BTHK, spec: Spec,
             blocks: Blocks, interpret):
  """dQ, dK, dV from the saved output and logsumexp (those of the whole attention when this is
  one block of it: ring attention passes the combined ones)."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  R = H // G
  delta_BH1T = jnp.einsum('bthk,bthk->bht', o_BTHK.astype(jnp.float32),
                          do_BTHK.astype(jnp.float32))[:, :, None]
  lse_BH1T = lse_BHT[:, :, None]
  q, k, v, do = (_to_bhtk(x) for x in (q_BTHK, k_BSGK, v_BSGK, do_BTHK))
  segc, segr = _seg_layouts(seg_BT, kv_seg_BS)

  bq, bk = blocks.dq_q, blocks.dq_kv
  nk = S // bk

  def kv_block(i, j):
    return _clamp(j, *tiles.kv_block_range(i, bq, bk, nk, spec))

  q_spec = pl.BlockSpec((None, None, bq, K), lambda b, h, i, j: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, bk, K), lambda b, h, i, j: (b, lax.div(h, R), kv_block(i, j), 0))
  stat_spec = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, spec=spec, bq=bq, bk=bk, nk=nk),
      grid=(B, H, T // bq, nk),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                None if segc is None else pl.BlockSpec((None, bq, LANES),
                                                       lambda b, h, i, j: (b, i, 0)),
                None if segr is None else pl.BlockSpec((None, SUBLANES, bk),
                                                       lambda b, h, i, j: (b, 0, kv_block(i, j)))],
      out_specs=q_spec,
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      scratch_shapes=[pltpu.VMEM((bq, K), jnp.float32)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary'),
      interpret=interpret, name='lm_flash_dq', cost_estimate=tiles.cost_estimate(
          'dq', q_BTHK.shape, k_BSGK.shape, spec,
          (q_BTHK, k_BSGK, v_BSGK, do_BTHK, seg_BT, kv_seg_BS)),
  )(q, k, v, do, lse_BH1T, delta_BH1T, segc, segr)

  bq, bk = blocks.dkv_q, blocks.dkv_kv
  nq = T // bq
  segc, segr = _seg_layouts(kv_seg_BS, seg_BT)  # logits^T: keys are the rows here

  def q_block(j, i):
    return _clamp(i, *tiles.q_block_range(j, bk, bq, nq, spec))

  q_spec = pl.BlockSpec((None, None, bq, K), lambda b, g, j, r, i: (b, g * R + r, q_block(j, i), 0))
  kv_spec = pl.BlockSpec((None, None, bk, K), lambda b, g, j, r, i: (b, g, j, 0))
  stat_spec = pl.BlockSpec((None, None, 1, bq),
                           lambda b, g, j, r, i: (b, g * R + r, 0, q_block(j, i)))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, spec=spec, bq=bq, bk=bk, nq=nq, R=R),
      grid=(B, G, S // bk, R, nq),
      in_specs=[q_spec, kv_spec, kv_spec, q_spec, stat_spec, stat_spec,
                None if segc is None else pl.BlockSpec((None, bk, LANES),
                                                       lambda b, g, j, r, i: (b, j, 0)),
                None if segr is None else pl.BlockSpec(
                    (None, SUBLANES, bq), lambda b, g, j, r, i: (b, 0, q_block(j, i)))],
      out_specs=[kv_spec, kv_spec],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      scratch_shapes=[pltpu.VMEM((bk, K), jnp.float32), pltpu.VMEM((bk, K), jnp.float32)],
      compiler_params=_params('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'),
      interpret=interpret, name='lm_flash_dkv', cost_estimate=tiles.cost_estimate(
          'dkv', q_BTHK.shape, k_BSGK.shape, spec,
          (q_BTHK, k_BSGK, v_BSGK, do_BTHK, seg_BT, kv_seg_BS)),
  )(q, k, v, do, lse_BH1T, delta_BH1T, segc, segr)
  return _to_bhtk(dq), _to_bhtk(dk), _to_bhtk(dv)
