"""Attention with causal and packed-segment masking, dispatched by `model.attention`.

Shapes: q_BTHK (batch, query length, query heads, head dim), k_BSGK / v_BSGK with G key/value
heads (grouped-query attention: each KV head serves H // G query heads, never materialised as
repeated K/V). segment_ids_BT: tokens attend only within their own segment (document); id 0 is
padding and only attends to other padding.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.model import ring_attention as ring_lib
from lm.model.kernels import block_tiles, flash_attention, triton_available
from lm.sharding import target  # pylint: disable=unused-import (lm.model.attention.target: the decision's input)

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')
BATCH_AXES = ('data', 'fsdp')  # mesh axes a batch is split over (lm.config mesh.rules 'batch')
HEAD_AXIS = 'tensor'  # mesh axis heads are split over ('heads', 'kv_heads')
CONTEXT_AXIS = 'context'  # mesh axis the sequence is split over (context parallelism)


# Causal self-attention over a whole sequence runs in this many query blocks, each against only
# the keys it can see (and, with a window, not those before it): 36 of the 64 blocks of the
# [T, T] logits for causal attention. On CPU (configs/bench_tiny.py's attention, T = 256, forward
# and backward) that took 14.3 ms against 20.4 ms for the whole logits (docs/pretraining.md).
QUERY_BLOCKS = 8
MIN_QUERY_BLOCK = 16  # shorter sequences take the whole logits: nothing worth skipping


def xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, causal=True, window=None,
                  softcap=None, scale=None, q_positions_BT=None, kv_positions_BS=None,
                  kv_segment_ids_BS=None, chunk=None, sinks=None):
  """The reference: plain einsums and a softmax in float32. Always available.
  scale: the logits' factor, head_dim ** -0.5 unless given (Gemma 2/3 set their own).
  sinks [H] (gpt-oss): a learned logit per head that joins every row's softmax and attends to
  nothing, so a query may put weight nowhere.

  Causal attention of a sequence to itself (no explicit positions, as in training) skips the
  key blocks that the mask would zero: `_query_blocked_attention`. Same values up to float
  rounding (tests/model/test_attention.py)."""
  T, S = q_BTHK.shape[1], k_BSGK.shape[1]
  if (causal and T == S and q_positions_BT is None and kv_positions_BS is None
      and kv_segment_ids_BS is None and T % QUERY_BLOCKS == 0
      and T // QUERY_BLOCKS >= MIN_QUERY_BLOCK):
    return _query_blocked_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, window=window,
                                    softcap=softcap, scale=scale, chunk=chunk, sinks=sinks)
  return _dense_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, causal=causal, window=window,
                          softcap=softcap, scale=scale, q_positions_BT=q_positions_BT,
                          kv_positions_BS=kv_positions_BS, kv_segment_ids_BS=kv_segment_ids_BS,
                          chunk=chunk, sinks=sinks)


def _query_blocked_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, *, window, softcap, scale,
                             chunk=None, sinks=None):
  """Causal self-attention as QUERY_BLOCKS dense attentions: the queries [start, end) against
  the keys [first, end) they can see: first = 0, or with a window the block boundary at or before
  start - window + 1, or with chunked attention the one at or before the start of start's chunk.
  The mask inside each block is the whole form's."""
  T = q_BTHK.shape[1]
  block = T // QUERY_BLOCKS
  seg = lambda ids, a, b: None if ids is None else ids[:, a:b]
  outs = []
  for start in range(0, T, block):
    end = start + block
    first = max(0, start - window + 1) // block * block if window else 0
    if chunk:
      first = max(first, start // chunk * chunk // block * block)
    outs.append(_dense_attention(
        q_BTHK[:, start:end], k_BSGK[:, first:end], v_BSGK[:, first:end],
        seg(segment_ids_BT, start, end), causal=True, window=window, softcap=softcap, scale=scale,
        q_positions_BT=jnp.arange(start, end)[None], kv_positions_BS=jnp.arange(first, end)[None],
        kv_segment_ids_BS=seg(segment_ids_BT, first, end), chunk=chunk, sinks=sinks))
  return jnp.concatenate(outs, axis=1)


def _dense_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, causal=True, window=None,
                     softcap=None, scale=None, q_positions_BT=None, kv_positions_BS=None,
                     kv_segment_ids_BS=None, chunk=None, sinks=None):
  """The whole [T, S] logits, masked."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum('btgrk,bsgk->bgrts', q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * (K ** -0.5 if scale is None else scale)
  if softcap:
    logits_BGRTS = softcap * jnp.tanh(logits_BGRTS / softcap)
  mask_BTS = make_mask(B, T, S, segment_ids_BT, causal=causal, window=window,
                       q_positions_BT=q_positions_BT, kv_positions_BS=kv_positions_BS,
                       kv_segment_ids_BS=kv_segment_ids_BS, chunk=chunk)
  if mask_BTS is not None:
    logits_BGRTS = jnp.where(mask_BTS[:, None, None], logits_BGRTS, jnp.finfo(jnp.float32).min)
  if sinks is not None:  # one more logit per row, dropped after the softmax
    sink_BGRT1 = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(1, G, H // G, 1, 1),
                                  (*logits_BGRTS.shape[:-1], 1))
    logits_BGRTS = jnp.concatenate([logits_BGRTS, sink_BGRT1], axis=-1)
    probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1)[..., :-1].astype(v_BSGK.dtype)
  else:
    probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = jnp.einsum('bgrts,bsgk->btgrk', probs_BGRTS, v_BSGK)
  return out_BTGRK.reshape(B, T, H, v_BSGK.shape[-1])  # values may be narrower than keys (MLA)


def make_mask(B, T, S, segment_ids_BT=None, *, causal=True, window=None, q_positions_BT=None,
              kv_positions_BS=None, kv_segment_ids_BS=None, chunk=None):
  """Boolean [B, T, S] mask: True where query t may attend to key s. `chunk` (Llama 4's
  chunked local attention): only keys in the query's own chunk of positions."""
  q_pos = q_positions_BT if q_positions_BT is not None else jnp.arange(T)[None] + (S - T)
  kv_pos = kv_positions_BS if kv_positions_BS is not None else jnp.arange(S)[None]
  mask = None
  if causal:
    mask = q_pos[:, :, None] >= kv_pos[:, None, :]
    if window:
      mask &= q_pos[:, :, None] - kv_pos[:, None, :] < window
    if chunk:
      mask &= q_pos[:, :, None] // chunk == kv_pos[:, None, :] // chunk
  if segment_ids_BT is not None:
    kv_seg = kv_segment_ids_BS if kv_segment_ids_BS is not None else segment_ids_BT
    same = segment_ids_BT[:, :, None] == kv_seg[:, None, :]
    mask = same if mask is None else mask & same
  if mask is not None:
    mask = jnp.broadcast_to(mask, (B, T, S))
  return mask


def cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, causal=True, window=None,
                    softcap=None, scale=None, **kwargs):
  """cuDNN fused attention through jax.nn.dot_product_attention; never a dense mask.

  cuDNN here takes causal masking and a sliding window, but not per-token segment ids (packed
  documents) or a logit soft-cap, and only fp16/bf16. Those calls go to our Pallas kernel,
  which expresses them without a mask tensor (or to the XLA reference where Pallas cannot
  run, e.g. cached decoding with explicit positions).
  """
  if segment_ids_BT is not None or softcap or q_BTHK.dtype not in (jnp.bfloat16, jnp.float16):
    impl = choose_implementation(q_BTHK, k_BSGK, **kwargs)
    return attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, implementation=impl, causal=causal,
                     window=window, softcap=softcap, scale=scale, **kwargs)
  if kwargs:
    raise ValueError(f"model.attention='cudnn' does not take {sorted(kwargs)}; use 'xla'")
  local = (window - 1, 0) if window and causal else None
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, scale=scale, is_causal=causal,
                                      local_window_size=local, implementation='cudnn')


def pallas_supported(q_BTHK, k_BSGK, **kwargs):
  """Whether lm.model.kernels.flash_attention can run this call on the current backend."""
  K = q_BTHK.shape[-1]
  if kwargs or q_BTHK.shape[1] != k_BSGK.shape[1]:  # explicit positions / cached decoding
    return False
  backend, _ = target()
  if backend == 'gpu':
    if not triton_available():
      return False
    return K & (K - 1) == 0 and 16 <= K <= 256  # Triton loads power-of-two tiles
  return backend == 'tpu'


def choose_implementation(q_BTHK, k_BSGK, **kwargs):
  """What 'auto' runs: Pallas on TPU/GPU where it applies, else the XLA reference.

  CPU stays on XLA (Pallas only runs there in the slow interpret mode). On several devices the
  kernel runs inside a shard_map over the mesh in context (a pallas_call is not partitioned by
  the SPMD compiler); with no mesh in context it cannot, so 'auto' stays on XLA there.
  """
  _, devices = target()
  in_mesh = not jax.sharding.get_abstract_mesh().empty
  if (devices == 1 or in_mesh) and pallas_supported(q_BTHK, k_BSGK, **kwargs):
    return 'pallas'
  return 'xla'


def attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, implementation='auto', **kwargs):
  """Dispatches to the implementation named in `model.attention`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention={implementation!r}; choose one of {IMPLEMENTATIONS}')
  kwargs = {k: v for k, v in kwargs.items() if v is not None}  # e.g. q_positions_BT=None
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.shape.get(CONTEXT_AXIS, 1) > 1:
    split = _context_parallel(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, mesh, implementation, kwargs)
    if split is not None:
      return split
  if ('chunk' in kwargs or 'sinks' in kwargs) and implementation != 'xla':
    implementation = 'xla'  # the fused kernels take no chunked mask or sinks (docs/attention.md)
  if implementation == 'auto':
    extra = {k: v for k, v in kwargs.items() if k not in ('causal', 'window', 'softcap', 'scale')}
    implementation = choose_implementation(q_BTHK, k_BSGK, **extra)
  if implementation == 'cudnn':
    return cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, **kwargs)
  if implementation == 'pallas':
    extra = sorted(k for k in kwargs if k not in ('causal', 'window', 'softcap', 'scale'))
    if extra:
      raise ValueError(f"model.attention='pallas' does not take {extra}; use 'xla'")
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
      return sharded_flash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, mesh=mesh, **kwargs)
    return flash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, **kwargs)
  return xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, **kwargs)


def _split_axes(mesh, size: int, candidates) -> tuple:
  """The mesh axes among `candidates` that evenly split a dimension of `size`, in order."""
  axes, product = [], 1
  for name in candidates:
    n = mesh.shape.get(name, 1)
    if n > 1 and size % (product * n) == 0:
      axes.append(name)
      product *= n
  return tuple(axes)


def _batch_and_head_axes(mesh, q_BTHK, k_BSGK):
  """The mesh axes (for a PartitionSpec) that split the batch (data, fsdp) and the heads (tensor).
  Heads split only when both query and KV heads divide, so each device keeps whole GQA groups."""
  B, _, H, _ = q_BTHK.shape
  batch = _split_axes(mesh, B, BATCH_AXES)
  heads = _split_axes(mesh, math.gcd(H, k_BSGK.shape[2]), (HEAD_AXIS,))
  return batch if len(batch) > 1 else (batch[0] if batch else None), heads[0] if heads else None


def _shard_map_attention(body, mesh, qkv_spec, segment_spec, q_BTHK, k_BSGK, v_BSGK, segment_ids_BT):
  """shard_map of body(q, k, v, segment_ids or None) with q/k/v (and the output) split by
  `qkv_spec` and the segment ids, when there are any, by `segment_spec`."""
  if segment_ids_BT is None:
    fn, args, specs = (lambda q, k, v: body(q, k, v, None)), (q_BTHK, k_BSGK, v_BSGK), (qkv_spec,) * 3
  else:
    fn, args = body, (q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)
    specs = (qkv_spec,) * 3 + (segment_spec,)
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=qkv_spec, check_vma=False)(*args)


def sharded_flash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, mesh, **kwargs):
  """The Pallas kernel on each device's block: a shard_map over the batch axes (data, fsdp) and
  the head axis (tensor). Other mesh axes see the whole batch block (XLA gathers it)."""
  b, h = _batch_and_head_axes(mesh, q_BTHK, k_BSGK)
  kernel = functools.partial(flash_attention, **kwargs)
  return _shard_map_attention(kernel, mesh, P(b, None, h, None), P(b, None),
                              q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)


def _context_parallel(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, mesh, implementation, kwargs):
  """Attention with the sequence split over the `context` axis, or None where the caller's
  plain path applies. In ring order (the Trainer's step with model.context_parallel=ring),
  causal attention without a window is ring attention; everything else attends the gathered
  K/V masked by each token's place in the original sequence."""
  order = None
  if ring_lib.in_ring_layout():
    T, context = q_BTHK.shape[1], mesh.shape[CONTEXT_AXIS]
    if set(kwargs) <= {'causal', 'softcap', 'scale'} and kwargs.get('causal', True):
      return ring_context_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, mesh=mesh,
                                    implementation=implementation, softcap=kwargs.get('softcap'),
                                    scale=kwargs.get('scale'))
    order = ring_lib.ring_order(T, context)
    if not set(kwargs) <= {'causal', 'window', 'softcap', 'scale'}:  # chunked, sinks: whole XLA
      B = q_BTHK.shape[0]
      positions = jnp.broadcast_to(jnp.asarray(order), (B, T))
      return xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, q_positions_BT=positions,
                           kv_positions_BS=positions, kv_segment_ids_BS=segment_ids_BT, **kwargs)
  if set(kwargs) <= {'causal', 'window', 'softcap', 'scale'}:
    return context_parallel_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, mesh=mesh,
                                      order=order, **kwargs)
  return None


def ring_blocks(q_BTHK, k_BSGK, v_BSGK, context: int, implementation: str) -> str:
  """'pallas' where the flash kernels can run ring attention's [c, 2c] blocks (c = T / 2C) on
  the target, else 'xla'. `auto` and `cudnn` follow choose_implementation's rule."""
  c = q_BTHK.shape[1] // (2 * context)
  if implementation == 'xla' or k_BSGK.shape != v_BSGK.shape or not (
      q_BTHK.dtype == k_BSGK.dtype == v_BSGK.dtype):
    return 'xla'
  if implementation != 'pallas' and not pallas_supported(q_BTHK, k_BSGK):
    return 'xla'
  return 'pallas' if block_tiles(c, 2 * c) is not None else 'xla'


def ring_context_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, mesh,
                           implementation='auto', softcap=None, scale=None):
  """Ring attention (lm/model/ring_attention.py) over the `context` axis, inside a shard_map that
  also splits the batch (data, fsdp) and the heads (tensor). The sequence must be in ring order."""
  context = mesh.shape[CONTEXT_AXIS]
  b, h = _batch_and_head_axes(mesh, q_BTHK, k_BSGK)
  ring = ring_lib.Ring(context, ring_blocks(q_BTHK, k_BSGK, v_BSGK, context, implementation),
                       softcap=softcap or None, scale=scale)
  body = lambda q, k, v, seg: ring_lib.ring_attention(q, k, v, seg, ring)
  return _shard_map_attention(body, mesh, P(b, CONTEXT_AXIS, h, None), P(b, CONTEXT_AXIS),
                              q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)


def context_parallel_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, mesh, causal=True,
                               window=None, softcap=None, scale=None, order=None):
  """Attention with the sequence split over the `context` mesh axis: each device keeps its
  queries and all-gathers the keys and values (and their segment ids), then masks by global
  position. The backward pass reduce-scatters dK and dV. Memory per device for everything but
  K/V falls with the context size. Attention inside is the XLA reference: the Pallas kernels
  take self-attention only (queries and keys of one length). `order`: the original position of
  each token when the sequence is reordered (ring_attention.ring_order), else None."""
  T = q_BTHK.shape[1]
  b, h = _batch_and_head_axes(mesh, q_BTHK, k_BSGK)
  global_index = jnp.arange(T) if order is None else jnp.asarray(order)

  def body(q, k, v, seg):
    B_local, T_local = q.shape[:2]
    gather = lambda x: jax.lax.all_gather(x, CONTEXT_AXIS, axis=1, tiled=True)
    start = jax.lax.axis_index(CONTEXT_AXIS) * T_local
    q_pos = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(global_index, start, T_local),
                             (B_local, T_local))
    kv_pos = jnp.broadcast_to(global_index, (B_local, T))
    return xla_attention(q, gather(k), gather(v), seg, causal=causal, window=window,
                         softcap=softcap, scale=scale, q_positions_BT=q_pos, kv_positions_BS=kv_pos,
                         kv_segment_ids_BS=None if seg is None else gather(seg))

  return _shard_map_attention(body, mesh, P(b, CONTEXT_AXIS, h, None), P(b, CONTEXT_AXIS),
                              q_BTHK, k_BSGK, v_BSGK, segment_ids_BT)
