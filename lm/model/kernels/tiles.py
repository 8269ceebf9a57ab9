"""Tile math shared by the TPU and GPU lowerings of flash attention.

Everything here works on one [rows, cols] tile of logits and is layout-agnostic: the caller
passes positions and segment ids already shaped to broadcast against the tile (a [bq, 1]
column and a [1, bk] row, or the transpose for the TPU dK/dV kernel, which works on
logits^T so that the saved per-query statistics are rows). Statistics (running max, sum,
logsumexp, delta) are columns or rows of the same broadcastable form, in float32.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
import numpy as np

# Finite, so that a fully masked tile gives exp(MASK - MASK) = 1 instead of NaN; any real
# logit seen later rescales those terms by exp(MASK - real) = 0. Probabilities are also
# zeroed under the mask, so rows with no visible key at all come out as exactly 0.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b
TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class Spec:
  """What is computed (static; part of the jit cache key)."""
  causal: bool = True
  window: int | None = None
  softcap: float | None = None
  scale: float = 1.0


def dot(a, b, dims, out_dtype=jnp.float32):
  # f32 inputs: full precision (no TF32) so the fp32 path matches the reference tightly.
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=out_dtype)


def logits(a, b, spec: Spec, dims=NT):
  """Scaled (and soft-capped) logits of one tile; also tanh(.) for the soft-cap gradient."""
  s = dot(a, b, dims) * spec.scale
  if not spec.softcap:
    return s, None
  t = jnp.tanh(s / spec.softcap)
  return spec.softcap * t, t


def visible(q_pos, k_pos, spec: Spec, q_seg=None, k_seg=None):
  """Boolean tile mask (None when nothing is masked); arguments broadcast to the tile."""
  mask = None
  if spec.causal:
    mask = k_pos <= q_pos
    if spec.window:
      mask = mask & (q_pos - k_pos < spec.window)
  if q_seg is not None:
    same = q_seg == k_seg
    mask = same if mask is None else mask & same
  return mask


def softmax_step(s, mask, m_prev, l_prev, acc_prev, v, pv_dims=NN):
  """One online-softmax update (FlashAttention-2): running max m, sum l, unnormalised acc."""
  if mask is not None:
    s = jnp.where(mask, s, MASK_VALUE)
  m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
  p = jnp.exp(s - m_next)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  alpha = jnp.exp(m_prev - m_next)
  l_next = alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)
  acc_next = alpha * acc_prev + dot(p.astype(v.dtype), v, pv_dims)
  return m_next, l_next, acc_next


def finish(m, l, acc):
  """Normalised output and natural-log logsumexp; rows that saw no key give 0 and -inf."""
  safe_l = jnp.where(l == 0.0, 1.0, l)
  lse = jnp.where(l == 0.0, -jnp.inf, m + jnp.log(safe_l))
  return acc / safe_l, lse


def probs_and_dlogits(s, t, mask, lse, dp, delta, spec: Spec):
  """Recomputed probabilities and d(raw logits) for one tile (raw = before soft-cap).

  dS = P * (dP - delta) with delta = rowsum(dO * O); the soft-cap chain rule adds
  (1 - tanh^2). The 1/sqrt(K) scale is applied by the caller on the accumulated dQ/dK.
  """
  p = jnp.exp(s - lse)
  if mask is not None:
    p = jnp.where(mask, p, 0.0)
  ds = p * (dp - delta)
  if t is not None:
    ds = ds * (1.0 - t * t)
  return p, ds


def kv_block_range(q_block, bq, bk, num_kv_blocks, spec: Spec):
  """[lo, hi) of the key blocks a query block can see (causal/window block skipping)."""
  lo, hi = 0, num_kv_blocks
  if spec.causal:
    hi = jnp.minimum(lax.div((q_block + 1) * bq + bk - 1, bk), num_kv_blocks)
    if spec.window:
      lo = jnp.maximum(lax.div(q_block * bq - spec.window + 1, bk), 0)
  return lo, hi


def q_block_range(kv_block, bk, bq, num_q_blocks, spec: Spec):
  """[lo, hi) of the query blocks that can see a key block."""
  lo, hi = 0, num_q_blocks
  if spec.causal:
    lo = lax.div(kv_block * bk, bq)
    if spec.window:
      hi = jnp.minimum(lax.div((kv_block + 1) * bk + spec.window - 2, bq) + 1, num_q_blocks)
  return lo, hi


# Within [lo, hi), the blocks in [full_lo, full_hi) need no causal/window mask (every pair is
# visible), so the GPU loops run them without building one. Numerators are kept >= 0 so
# lax.div (truncating) equals floor division; results are clipped into [lo, hi].

def kv_full_range(q_block, bq, bk, lo, hi, spec: Spec):
  if not spec.causal:
    return lo, hi
  full_hi = lax.div(q_block * bq + 1, bk)  # key block entirely <= the first query row
  full_lo = lo
  if spec.window:  # key block entirely within the window of the last query row
    full_lo = lax.div(jnp.maximum((q_block + 1) * bq - 1 - spec.window + bk, 0), bk)
  full_lo = jnp.clip(full_lo, lo, hi)
  return full_lo, jnp.clip(full_hi, full_lo, hi)


def q_full_range(kv_block, bk, bq, lo, hi, spec: Spec):
  if not spec.causal:
    return lo, hi
  full_lo = jnp.clip(lax.div((kv_block + 1) * bk + bq - 2, bq), lo, hi)
  full_hi = hi
  if spec.window:
    full_hi = lax.div(kv_block * bk + spec.window, bq)
  return full_lo, jnp.clip(full_hi, full_lo, hi)


def segments(lo, hi, full_lo, full_hi):
  """The three runs of a block range: (start, stop, needs_position_mask)."""
  return ((lo, full_lo, True), (full_lo, full_hi, False), (full_hi, hi, True))


# Matmuls per (query, key, head dim) in each kernel: forward QKᵀ and PV; dq recomputes QKᵀ and
# takes dO·Vᵀ and dS·K; dkv recomputes QKᵀ and takes Pᵀ·dO, dO·Vᵀ and dSᵀ·Q.
MATMULS = {'fwd': 2, 'dq': 3, 'dkv': 4}


def cost_estimate(kind: str, q_shape, kv_shape, spec: Spec, operands):
  """What a kernel costs, for XLA's scheduler (a pallas_call is opaque to it otherwise): 2 FLOPs
  per multiply-add over the visible (query, key) pairs, one exp each, every operand read once."""
  from jax.experimental import pallas as pl  # pylint: disable=import-outside-toplevel
  B, T, H, K = q_shape
  S = kv_shape[1]
  if spec.causal and spec.window:
    visible_pairs = T * min(spec.window, S)
  elif spec.causal:
    visible_pairs = T * (S + 1) // 2
  else:
    visible_pairs = T * S
  pairs = B * H * visible_pairs
  return pl.CostEstimate(flops=int(2 * MATMULS[kind] * pairs * K), transcendentals=int(pairs),
                         bytes_accessed=int(sum(np.prod(x.shape) * x.dtype.itemsize
                                                for x in operands if x is not None)))
