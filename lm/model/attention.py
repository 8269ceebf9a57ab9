"""Attention with causal and packed-segment masking, dispatched by `model.attention`.

Shapes: q_BTHK (batch, query length, query heads, head dim), k_BSGK / v_BSGK with G key/value
heads (grouped-query attention: each KV head serves H // G query heads, never materialised as
repeated K/V). segment_ids_BT: tokens attend only within their own segment (document); id 0 is
padding and only attends to other padding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')


def xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, causal=True, window=None,
                  softcap=None, scale=None, q_positions_BT=None, kv_positions_BS=None,
                  kv_segment_ids_BS=None):
  """The reference: plain einsums and a softmax in float32. Always available.
  scale: the logits' factor, head_dim ** -0.5 unless given (Gemma 2/3 set their own)."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum('btgrk,bsgk->bgrts', q_BTGRK, k_BSGK,
                            preferred_element_type=jnp.float32) * (K ** -0.5 if scale is None else scale)
  if softcap:
    logits_BGRTS = softcap * jnp.tanh(logits_BGRTS / softcap)
  mask_BTS = make_mask(B, T, S, segment_ids_BT, causal=causal, window=window,
                       q_positions_BT=q_positions_BT, kv_positions_BS=kv_positions_BS,
                       kv_segment_ids_BS=kv_segment_ids_BS)
  if mask_BTS is not None:
    logits_BGRTS = jnp.where(mask_BTS[:, None, None], logits_BGRTS, jnp.finfo(jnp.float32).min)
  probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGK.dtype)
  out_BTGRK = jnp.einsum('bgrts,bsgk->btgrk', probs_BGRTS, v_BSGK)
  return out_BTGRK.reshape(B, T, H, K)


def make_mask(B, T, S, segment_ids_BT=None, *, causal=True, window=None, q_positions_BT=None,
              kv_positions_BS=None, kv_segment_ids_BS=None):
  """Boolean [B, T, S] mask: True where query t may attend to key s."""
  q_pos = q_positions_BT if q_positions_BT is not None else jnp.arange(T)[None] + (S - T)
  kv_pos = kv_positions_BS if kv_positions_BS is not None else jnp.arange(S)[None]
  mask = None
  if causal:
    mask = q_pos[:, :, None] >= kv_pos[:, None, :]
    if window:
      mask &= q_pos[:, :, None] - kv_pos[:, None, :] < window
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
  backend = jax.default_backend()
  if backend == 'gpu':
    try:
      from jax.experimental.pallas import triton  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError:  # the Triton backend is deprecated in JAX 0.11 and may be removed
      return False
    return K & (K - 1) == 0 and 16 <= K <= 256  # Triton loads power-of-two tiles
  return backend == 'tpu'


def choose_implementation(q_BTHK, k_BSGK, **kwargs):
  """What 'auto' runs: Pallas on one TPU/GPU where it applies, else the XLA reference.

  CPU stays on XLA (Pallas only runs there in the slow interpret mode). With more than one
  device, 'auto' also stays on XLA: a pallas_call is not partitioned by the SPMD compiler,
  so it needs a shard_map around it first (see docs/attention.md).
  """
  if jax.device_count() == 1 and pallas_supported(q_BTHK, k_BSGK, **kwargs):
    return 'pallas'
  return 'xla'


def attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT=None, *, implementation='auto', **kwargs):
  """Dispatches to the implementation named in `model.attention`."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'model.attention={implementation!r}; choose one of {IMPLEMENTATIONS}')
  kwargs = {k: v for k, v in kwargs.items() if v is not None}  # e.g. q_positions_BT=None
  if implementation == 'auto':
    extra = {k: v for k, v in kwargs.items() if k not in ('causal', 'window', 'softcap', 'scale')}
    implementation = choose_implementation(q_BTHK, k_BSGK, **extra)
  if implementation == 'cudnn':
    return cudnn_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, **kwargs)
  if implementation == 'pallas':
    from lm.model.kernels import flash_attention  # pylint: disable=import-outside-toplevel
    extra = sorted(k for k in kwargs if k not in ('causal', 'window', 'softcap', 'scale'))
    if extra:
      raise ValueError(f"model.attention='pallas' does not take {extra}; use 'xla'")
    return flash_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, **kwargs)
  return xla_attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, **kwargs)
