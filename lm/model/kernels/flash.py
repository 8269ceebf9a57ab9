"""Flash attention: public entry, padding, and the custom VJP shared by both lowerings.

The forward saves (q, k, v, segment ids, out, logsumexp); the backward recomputes the
probabilities tile by tile from the logsumexp, so memory is linear in sequence length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from lm.model.kernels import flash_gpu, flash_tpu
from lm.sharding import target
from lm.model.kernels.tiles import Spec

LOWERINGS = {'gpu': flash_gpu, 'tpu': flash_tpu}
PAD_SEGMENT = -1  # id for padded tokens: never equal to a real id (real ids are >= 0)


@dataclasses.dataclass(frozen=True)
class _Config:
  spec: Spec
  lowering: str
  blocks: object
  interpret: bool


def default_lowering():
  """'tpu' on TPU, else 'gpu' (the Triton-style kernels; also used in CPU interpret mode)."""
  return 'tpu' if target()[0] == 'tpu' else 'gpu'


def flash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, causal=True, window=None,
                    softcap=None, scale=None, lowering=None, blocks=None, interpret=None):
  """Fused attention with the semantics of `lm.model.attention.xla_attention` (self-attention).

  q [B, T, H, K]; k, v [B, T, G, K] with H % G == 0; segment_ids [B, T] int (tokens attend
  only within equal ids; 0 is padding and attends to other padding). bf16/f16/f32 inputs,
  f32 accumulation; output in q's dtype. Any T: it is padded up to the block size.
  lowering: 'gpu' | 'tpu' (default: per backend); interpret defaults to True on CPU.
  """
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  if S != T:
    raise ValueError(f'flash_attention is self-attention only: q length {T} != kv length {S}; '
                     "use model.attention='xla' for cached decoding")
  if H % G or k_BSGK.shape != v_BSGK.shape or k_BSGK.shape[::3] != (B, K):
    raise ValueError(f'bad shapes q={q_BTHK.shape} k={k_BSGK.shape} v={v_BSGK.shape}')
  if not q_BTHK.dtype == k_BSGK.dtype == v_BSGK.dtype:
    raise ValueError(f'q, k, v dtypes differ: {q_BTHK.dtype}, {k_BSGK.dtype}, {v_BSGK.dtype}')
  if window is not None and window < 1:
    raise ValueError(f'window must be >= 1, got {window}')
  lowering = lowering or default_lowering()
  module = LOWERINGS[lowering]
  if interpret is None:
      interpret = target()[0] == 'cpu'
  blocks = (blocks or module.Blocks()).fit(T)
  spec = Spec(causal=causal, window=window if causal else None, softcap=softcap or None,
              scale=float(K ** -0.5 if scale is None else scale))

  step = max(blocks.sizes())
  pad = -T % step
  seg_BT = segment_ids_BT
  if seg_BT is not None:
    seg_BT = seg_BT.astype(jnp.int32)
  if pad:
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    q_BTHK, k_BSGK, v_BSGK = (jnp.pad(x, widths) for x in (q_BTHK, k_BSGK, v_BSGK))
    # Causal attention already hides the (later) padded keys from real queries; otherwise
    # padded tokens get their own segment.
    if seg_BT is not None or not causal:
      seg_BT = jnp.zeros((B, T), jnp.int32) if seg_BT is None else seg_BT
      seg_BT = jnp.pad(seg_BT, ((0, 0), (0, pad)), constant_values=PAD_SEGMENT)
  out = _flash(q_BTHK, k_BSGK, v_BSGK, seg_BT, _Config(spec, lowering, blocks, bool(interpret)))
  return out[:, :T] if pad else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, seg, cfg):
  return _flash_fwd(q, k, v, seg, cfg)[0]


def _flash_fwd(q, k, v, seg, cfg):
  out, lse = LOWERINGS[cfg.lowering].forward(q, k, v, seg, seg, cfg.spec, cfg.blocks,
                                             cfg.interpret)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(cfg, res, do):
  q, k, v, seg, out, lse = res
  dq, dk, dv = LOWERINGS[cfg.lowering].backward(q, k, v, seg, seg, out, lse, do, cfg.spec,
                                                cfg.blocks, cfg.interpret)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# One block of a larger attention (ring attention, lm/model/ring_attention.py): the queries of one
# chunk against the keys of another, each with its own segment ids. The forward returns the
# logsumexp the caller needs to combine blocks; the backward takes the combined output and
# logsumexp, so its probabilities are those of the whole softmax. Not differentiable by itself:
# the caller's custom VJP calls both. Lengths must be multiples of the blocks (no padding).


def block_tiles(T: int, S: int, *, lowering=None, blocks=None):
  """The lowering's blocks fitted to a [T, S] block of attention, or None where they do not tile
  it (then the caller uses the XLA reference)."""
  module = LOWERINGS[lowering or default_lowering()]
  blocks = (blocks or module.Blocks()).fit(min(T, S))
  step = max(blocks.sizes())
  return blocks if T % step == 0 and S % step == 0 else None


def _block_config(q, k, causal, softcap, scale, lowering, blocks, interpret):
  T, S, K = q.shape[1], k.shape[1], q.shape[-1]
  if causal and T != S:
    raise ValueError(f'a causal block must be square: {T} queries, {S} keys')
  lowering = lowering or default_lowering()
  fitted = block_tiles(T, S, lowering=lowering, blocks=blocks)
  if fitted is None:
    raise ValueError(f'a [{T}, {S}] attention block does not tile into the {lowering} blocks')
  spec = Spec(causal=causal, softcap=softcap or None,
              scale=float(K ** -0.5 if scale is None else scale))
  return _Config(spec, lowering, fitted, target()[0] == 'cpu' if interpret is None else interpret)


def block_forward(q_BTHK, k_BSGK, v_BSGK, seg_BT=None, kv_seg_BS=None, *, causal=False,
                  softcap=None, scale=None, lowering=None, blocks=None, interpret=None):
  """(out [B, T, H, K] in q's dtype, logsumexp [B, H, T] float32) of one block; rows that see no
  key give 0 and -inf."""
  cfg = _block_config(q_BTHK, k_BSGK, causal, softcap, scale, lowering, blocks, interpret)
  segs = (None, None) if seg_BT is None else (seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32))
  return LOWERINGS[cfg.lowering].forward(q_BTHK, k_BSGK, v_BSGK, *segs, cfg.spec, cfg.blocks,
                                         cfg.interpret)


def block_backward(q_BTHK, k_BSGK, v_BSGK, seg_BT, kv_seg_BS, out_BTHK, lse_BHT, do_BTHK, *,
                   causal=False, softcap=None, scale=None, lowering=None, blocks=None,
                   interpret=None):
  """(dq, dk, dv) of one block, given the whole attention's output and logsumexp for its rows."""
  cfg = _block_config(q_BTHK, k_BSGK, causal, softcap, scale, lowering, blocks, interpret)
  segs = (None, None) if seg_BT is None else (seg_BT.astype(jnp.int32), kv_seg_BS.astype(jnp.int32))
  return LOWERINGS[cfg.lowering].backward(q_BTHK, k_BSGK, v_BSGK, *segs, out_BTHK, lse_BHT,
                                          do_BTHK, cfg.spec, cfg.blocks, cfg.interpret)
