"""Ring attention: causal attention over a sequence split on the `context` mesh axis, passing
K/V blocks from device to device (`lax.ppermute`) instead of gathering them.

Layout (zigzag, load-balanced for the causal mask): a sequence of T tokens is cut into 2C chunks
of c = T / 2C tokens, and device d of the C on the `context` axis holds chunk d followed by chunk
2C-1-d (`ring_order`). The Trainer reorders every per-token array of its batch this way where
it splits the sequence (tokens, targets, weights, positions and segment ids travel together;
lm/train/loop.py), and sets `ring_layout()` so attention knows.

Each device keeps its queries; the K/V blocks go round the ring in C - 1 steps. At step 0 a
device attends its own block causally (chunk order is global order). At step s it holds the
block of device j = (d - s) mod C, and exactly half of the [2c, 2c] pairs are visible, with no
position mask at all:
  j < d: all its queries see j's first chunk (chunk j is before both of d's);
  j > d: only its second chunk (2C-1-d) sees anything, and it sees both of j's chunks.
So every device does the same c x 2c work per step and the causally hidden half is never
computed. With packed documents (segment ids) a step is skipped outright when no row of the
batch has a segment id range in common with the visiting block's.

Blocks combine by their log-sum-exp (online softmax). The backward pass is a custom VJP that runs
the ring again, the other way round: each step's block gradient uses the combined output and
log-sum-exp (so its probabilities are those of the whole softmax), dQ stays home, and dK/dV
travel with their K/V block and take one more hop home at the end. Per block: the Pallas flash
kernels (lm/model/kernels, `block_forward` / `block_backward`) on TPU/GPU, the XLA form below
elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lm.errors import ConfigError
from lm.model import kernels

CONTEXT_AXIS = 'context'

_RING_LAYOUT = contextvars.ContextVar('lm_ring_layout', default=False)


@contextlib.contextmanager
def ring_layout():
  """Within this context, sequences split over the `context` axis are in `ring_order` and
  attention over them is ring attention (lm/model/attention.py)."""
  token = _RING_LAYOUT.set(True)
  try:
    yield
  finally:
    _RING_LAYOUT.reset(token)


def in_ring_layout() -> bool:
  return _RING_LAYOUT.get()


def check_splits(seq_len: int, context: int) -> None:
  """Raises ConfigError unless a sequence cuts into 2 x context equal chunks."""
  if seq_len % (2 * context):
    raise ConfigError(f'data.seq_len={seq_len} does not split into 2 x mesh.shape.context='
                      f'{context} equal chunks for model.context_parallel=ring; use a multiple of '
                      f'{2 * context}')


def chunk_order(context: int) -> np.ndarray:
  """The chunks of a sequence in ring order: 0, 2C-1, 1, 2C-2, ..., C-1, C."""
  return np.stack([np.arange(context), 2 * context - 1 - np.arange(context)], axis=1).reshape(-1)


def ring_order(seq_len: int, context: int) -> np.ndarray:
  """Position p of the reordered sequence holds token ring_order(...)[p] of the original."""
  c = seq_len // (2 * context)
  return (chunk_order(context)[:, None] * c + np.arange(c)).reshape(-1)


def to_ring_order(x, context: int):
  """[B, T, ...] -> the same with the sequence (axis 1) in ring order."""
  B, T = x.shape[:2]
  chunks = x.reshape(B, 2 * context, T // (2 * context), *x.shape[2:])
  return jnp.take(chunks, chunk_order(context), axis=1).reshape(x.shape)


# --- One block: the queries of some chunks against the keys of others -----------------------------

def _xla_logits(q_BTHK, k_BSGK, softcap, scale):
  B, T, H, K = q_BTHK.shape
  G = k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  s_BGRTS = jnp.einsum('btgrk,bsgk->bgrts', q_BTGRK, k_BSGK,
                       preferred_element_type=jnp.float32) * scale
  if not softcap:
    return s_BGRTS, None
  t = jnp.tanh(s_BGRTS / softcap)
  return softcap * t, t


def _xla_mask(T, S, seg_BT, kv_seg_BS, causal):
  """[B or 1, 1, 1, T, S] boolean, or None when every pair is visible."""
  mask = jnp.tril(jnp.ones((T, S), bool))[None] if causal else None
  if seg_BT is not None:
    same = seg_BT[:, :, None] == kv_seg_BS[:, None, :]
    mask = same if mask is None else mask & same
  return None if mask is None else mask[:, None, None]


def xla_block_forward(q_BTHK, k_BSGK, v_BSGK, seg_BT=None, kv_seg_BS=None, *, causal=False,
                      softcap=None, scale=None):
  """(out [B, T, H, Kv] in q's dtype, logsumexp [B, H, T] float32); rows that see no key give 0
  and -inf, as the Pallas kernels do."""
  B, T, H, K = q_BTHK.shape
  S = k_BSGK.shape[1]
  s, _ = _xla_logits(q_BTHK, k_BSGK, softcap, K ** -0.5 if scale is None else scale)
  mask = _xla_mask(T, S, seg_BT, kv_seg_BS, causal)
  if mask is not None:
    s = jnp.where(mask, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.exp(s - m)
  l = jnp.sum(p, axis=-1, keepdims=True)
  out_BGRTK = jnp.einsum('bgrts,bsgk->bgrtk', p.astype(v_BSGK.dtype), v_BSGK,
                         preferred_element_type=jnp.float32) / jnp.where(l > 0, l, 1.0)
  lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)[..., 0]
  out = jnp.einsum('bgrtk->btgrk', out_BGRTK).reshape(B, T, H, v_BSGK.shape[-1])
  return out.astype(q_BTHK.dtype), lse.reshape(B, H, T)


def xla_block_backward(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS, out_BTHK, lse_BHT, do_BTHK, *,
                       causal=False, softcap=None, scale=None):
  """(dq, dk, dv) of one block from the whole attention's output and logsumexp for its rows."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  R = H // G
  scale = K ** -0.5 if scale is None else scale
  s, t = _xla_logits(q_BTHK, k_BSGK, softcap, scale)
  p = jnp.exp(s - lse_BHT.reshape(B, G, R, T, 1))
  mask = _xla_mask(T, S, seg_BT, kv_seg_BS, causal)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  do_BTGRK = do_BTHK.reshape(B, T, G, R, -1)
  dv = jnp.einsum('bgrts,btgrk->bsgk', p.astype(do_BTHK.dtype), do_BTGRK,
                  preferred_element_type=jnp.float32)
  dp = jnp.einsum('btgrk,bsgk->bgrts', do_BTGRK, v_BSGK, preferred_element_type=jnp.float32)
  delta = jnp.einsum('btgrk,btgrk->bgrt', out_BTHK.reshape(do_BTGRK.shape).astype(jnp.float32),
                     do_BTGRK.astype(jnp.float32))[..., None]
  ds = p * (dp - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)
  dq = jnp.einsum('bgrts,bsgk->btgrk', ds.astype(k_BSGK.dtype), k_BSGK,
                  preferred_element_type=jnp.float32).reshape(B, T, H, K) * scale
  dk = jnp.einsum('bgrts,btgrk->bsgk', ds.astype(q_BTHK.dtype), q_BTHK.reshape(B, T, G, R, K),
                  preferred_element_type=jnp.float32) * scale
  return dq, dk, dv


BLOCKS = {'xla': (xla_block_forward, xla_block_backward),
          'pallas': (kernels.block_forward, kernels.block_backward)}


# --- The ring ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ring:
  """What is computed (static): devices on the context axis, the block implementation, the mask."""
  context: int
  blocks: str = 'xla'  # 'xla' | 'pallas'
  softcap: float | None = None
  scale: float | None = None

  def forward(self, *args, causal=False):
    return BLOCKS[self.blocks][0](*args, causal=causal, softcap=self.softcap, scale=self.scale)

  def backward(self, *args, causal=False):
    return BLOCKS[self.blocks][1](*args, causal=causal, softcap=self.softcap, scale=self.scale)


def ring_attention(q_BTHK, k_BSGK, v_BSGK, seg_BT, ring: Ring):
  """Causal attention of this device's queries (a shard_map body over `context`, the sequence in
  ring order) against the whole sequence's keys. seg_BT: segment ids or None."""
  return _ring(q_BTHK, k_BSGK, v_BSGK, seg_BT, ring)


def _slice(x, lo, hi, axis=1):
  return None if x is None else jax.lax.slice_in_dim(x, lo, hi, axis=axis)


def _disjoint(ids_a, ids_b):
  """True when no row of the batch has a segment id in both (their [min, max] ranges apart)."""
  apart = ((jnp.max(ids_a, axis=1) < jnp.min(ids_b, axis=1))
           | (jnp.max(ids_b, axis=1) < jnp.min(ids_a, axis=1)))
  return jnp.all(apart)


def _branch(source, seg_BT, kv_seg_BS):
  """What a device does with the block of device `source`: 0 nothing (no shared segment), 1 all
  its queries against the block's first chunk, 2 its second chunk's queries against all of it."""
  earlier = source < jax.lax.axis_index(CONTEXT_AXIS)
  if seg_BT is None:
    return jnp.where(earlier, 1, 2)
  c = seg_BT.shape[1] // 2
  skip_earlier = _disjoint(seg_BT, kv_seg_BS[:, :c])
  skip_later = _disjoint(seg_BT[:, c:], kv_seg_BS)
  return jnp.where(earlier, jnp.where(skip_earlier, 0, 1), jnp.where(skip_later, 0, 2))


def _shift(x, ring: Ring, direction: int):
  """Every device's x to the next device on the ring (direction 1) or the previous one (-1)."""
  perm = [(j, (j + direction) % ring.context) for j in range(ring.context)]
  return jax.tree.map(lambda a: jax.lax.ppermute(a, CONTEXT_AXIS, perm), x)


def _source(step, ring: Ring, direction: int):
  """The device whose K/V block another holds after `step` shifts in `direction`."""
  return (jax.lax.axis_index(CONTEXT_AXIS) - direction * step) % ring.context


def _merge(out_BTHK, lse_BHT, block_out_BTHK, block_lse_BHT):
  """Two partial softmax attentions over disjoint keys -> one (float32)."""
  lse = jnp.logaddexp(lse_BHT, block_lse_BHT)
  safe = jnp.where(jnp.isneginf(lse), 0.0, lse)  # rows that saw no key yet: both weights 0
  weight = lambda l: jnp.swapaxes(jnp.exp(l - safe), 1, 2)[..., None]
  return out_BTHK * weight(lse_BHT) + block_out_BTHK.astype(jnp.float32) * weight(block_lse_BHT), lse


def _ring_forward(q, k, v, seg, ring: Ring):
  c = q.shape[1] // 2
  out, lse = ring.forward(q, k, v, seg, seg, causal=True)
  out = out.astype(jnp.float32)
  kv = (k, v, seg)
  for step in range(1, ring.context):
    kv = _shift(kv, ring, 1)
    k_s, v_s, seg_s = kv

    def earlier(out, lse, k_s=k_s, v_s=v_s, seg_s=seg_s):
      block = ring.forward(q, k_s[:, :c], v_s[:, :c], seg, _slice(seg_s, 0, c))
      return _merge(out, lse, *block)

    def later(out, lse, k_s=k_s, v_s=v_s, seg_s=seg_s):
      block = ring.forward(q[:, c:], k_s, v_s, _slice(seg, c, 2 * c), seg_s)
      hi_out, hi_lse = _merge(out[:, c:], lse[..., c:], *block)
      return (jnp.concatenate([out[:, :c], hi_out], axis=1),
              jnp.concatenate([lse[..., :c], hi_lse], axis=-1))

    out, lse = jax.lax.switch(_branch(_source(step, ring, 1), seg, seg_s),
                              [lambda o, l: (o, l), earlier, later], out, lse)
  return out.astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, seg, ring):
  return _ring_forward(q, k, v, seg, ring)[0]


def _ring_fwd(q, k, v, seg, ring):
  out, lse = _ring_forward(q, k, v, seg, ring)
  return out, (q, k, v, seg, out, lse)


def _ring_bwd(ring, res, do):
  q, k, v, seg, out, lse = res
  c = q.shape[1] // 2
  f32 = lambda *xs: tuple(x.astype(jnp.float32) for x in xs)
  dq, dk, dv = f32(*ring.backward(q, k, v, seg, seg, out, lse, do, causal=True))
  kv, dkv = (k, v, seg), (dk, dv)
  for step in range(1, ring.context):
    # The other way round from the forward: the same shifts would be one computation to XLA,
    # which would then keep every block the forward received alive until the backward.
    kv, dkv = _shift(kv, ring, -1), _shift(dkv, ring, -1)  # dK/dV travel with their K/V block
    k_s, v_s, seg_s = kv

    def earlier(dq, dk, dv, k_s=k_s, v_s=v_s, seg_s=seg_s):
      bq, bk, bv = f32(*ring.backward(q, k_s[:, :c], v_s[:, :c], seg, _slice(seg_s, 0, c), out,
                                      lse, do))
      return dq + bq, dk.at[:, :c].add(bk), dv.at[:, :c].add(bv)

    def later(dq, dk, dv, k_s=k_s, v_s=v_s, seg_s=seg_s):
      bq, bk, bv = f32(*ring.backward(q[:, c:], k_s, v_s, _slice(seg, c, 2 * c), seg_s,
                                      out[:, c:], lse[..., c:], do[:, c:]))
      return dq.at[:, c:].add(bq), dk + bk, dv + bv

    dq, *dkv = jax.lax.switch(_branch(_source(step, ring, -1), seg, seg_s),
                              [lambda *g: g, earlier, later], dq, *dkv)
  dk, dv = _shift(tuple(dkv), ring, -1)  # the last hop: each block's gradients reach its device
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
