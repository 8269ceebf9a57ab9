"""Multi-head latent attention (DeepSeek-V2/V3) as a token mixer: every head's keys and values are
projected up from one low-rank latent per token, so the decoding cache holds that latent (and one
rotated key shared by all heads) instead of per-head keys and values.

Shapes: C the key/value latent (kv_lora_rank), N the per-head dims without RoPE, P those with it
(qk_rope_head_dim), Q = N + P the query/key head dim, V the value head dim.

  q_BTHQ = q_b(norm(q_a(x)))          (q(x) when q_lora_rank is 0)
  [c_BTC, k_pe_BTP] = kv_a(x)         c RMS-normed; k_pe is one key part for every head
  [k_nope_BTHN, v_BTHV] = kv_b(c_BTC)
  keys [k_nope, rope(k_pe)], queries [q_nope, rope(q_pe)], softmax scale Q ** -0.5 times YaRN's
  mscale(factor, mscale_all_dim) ** 2, as DeepSeek's reference and transformers compute it.

Without a cache (training, scoring) the latent is expanded into per-head keys and values and runs
through lm's attention, any implementation. With a cache, kv_b is absorbed instead: the queries'
nope part goes through kv_b's key half into latent space and scores the cached latents directly,
and the attention-weighted latent goes through kv_b's value half; the cache's per-head keys and
values are never built. Parameter names mirror transformers' (q_a_proj -> layers.attn.q_a, ...)
so LoRA targets, partitions and logical axes need nothing new.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import mla_problem
from lm.errors import ConfigError
from lm.model import attention as attention_lib
from lm.model.layers import Linear, RMSNorm
from lm.model.mixers.attention import _mask_args, mask_kinds
from lm.model.rope import apply_rope

LATENT = 'latent'  # logical axis of the latents: no mesh rule names it, so it stays replicated
# transformers builds q_a_layernorm and kv_a_layernorm without the config's rms_norm_eps, so
# they keep DeepseekV3RMSNorm's default epsilon.
LATENT_NORM_EPS = 1e-6


def softmax_scale(cfg) -> float:
  """Q ** -0.5, times mscale ** 2 when scaled RoPE sets `mscale_all_dim` (transformers'
  yarn_apply_mscale): DeepSeek scales all of q · k, not only the rotated dims."""
  mla, scaling = cfg.mla, cfg.rope_scaling
  scale = (mla.qk_nope_head_dim + mla.qk_rope_head_dim) ** -0.5
  if scaling and scaling.get('mscale_all_dim'):
    factor = scaling['factor']
    mscale = 1.0 if factor <= 1 else 0.1 * scaling['mscale_all_dim'] * math.log(factor) + 1.0
    scale *= mscale * mscale
  return scale


class MLA(nnx.Module):
  """x_BTD -> attention output [B, T, D]; with a cache, also the updated {'latent', 'k_rope'}."""

  stack_name = 'attn'

  def __init__(self, cfg, *, rngs):
    problem = mla_problem(cfg)
    if problem:
      raise ConfigError(problem)
    D, H, mla = cfg.d_model, cfg.n_heads, cfg.mla
    C, N, P, V = mla.kv_lora_rank, mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    heads = ('heads', 'head_dim')
    self.q_lora_rank = mla.q_lora_rank
    if mla.q_lora_rank:
      R = mla.q_lora_rank
      self.q_a = lin((D,), (R,), ('embed',), (LATENT,), use_bias=cfg.qkv_bias, name='layers.attn.q_a')
      self.q_a_norm = RMSNorm(R, cfg=cfg, rngs=rngs, axis=LATENT, eps=LATENT_NORM_EPS)
      self.q_b = lin((R,), (H, N + P), (LATENT,), heads, name='layers.attn.q_b')
    else:
      self.q = lin((D,), (H, N + P), ('embed',), heads, name='layers.attn.q')
    self.kv_a = lin((D,), (C + P,), ('embed',), (LATENT,), use_bias=cfg.qkv_bias,
                    name='layers.attn.kv_a')
    self.kv_a_norm = RMSNorm(C, cfg=cfg, rngs=rngs, axis=LATENT, eps=LATENT_NORM_EPS)
    self.kv_b = lin((C,), (H, N + V), (LATENT,), heads, name='layers.attn.kv_b')
    self.o = lin((H, V), (D,), heads, ('embed',), use_bias=cfg.attn_out_bias, name='layers.attn.o')
    self.dims = (C, N, P, V)
    self.rope_interleaved = bool(cfg.rope_interleaved)
    self.implementation = cfg.attention
    self.masks = mask_kinds(cfg)
    self.scale = softmax_scale(cfg)

  @staticmethod
  def init_cache(cfg, batch_size: int, max_len: int, dtype) -> dict:
    C, P = cfg.mla.kv_lora_rank, cfg.mla.qk_rope_head_dim
    return {'latent': jnp.zeros((batch_size, max_len, C), dtype),
            'k_rope': jnp.zeros((batch_size, max_len, P), dtype)}

  @staticmethod
  def cache_axes() -> dict:
    return {'latent': ('batch', 'length', LATENT), 'k_rope': ('batch', 'length', 'head_dim')}

  def __call__(self, x_BTD, ctx, cache=None):
    C, N, P, _ = self.dims
    layer, positions_BT = ctx.layer, ctx.positions_BT
    if self.q_lora_rank:
      q_BTHQ = self.q_b(self.q_a_norm(self.q_a(x_BTD)))
    else:
      q_BTHQ = self.q(x_BTD)
    q_nope_BTHN = q_BTHQ[..., :N]
    q_rope_BTHP = self._rope(q_BTHQ[..., N:], positions_BT, layer)
    compressed_BTX = self.kv_a(x_BTD)  # X = C + P
    latent_BTC = self.kv_a_norm(compressed_BTX[..., :C])
    k_rope_BT1P = self._rope(compressed_BTX[..., None, C:], positions_BT, layer)
    if cache is None:
      return self._expanded(q_nope_BTHN, q_rope_BTHP, latent_BTC, k_rope_BT1P, ctx), None
    # Decoding: this call's latents at slot `index`; the cache's positions and segment ids
    # (0 = empty or padding) already include this call's.
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), ctx.index, 1)
    latent_BSC = write(cache['latent'], latent_BTC)
    k_rope_BSP = write(cache['k_rope'], k_rope_BT1P[:, :, 0])
    out_BTD = self._absorbed(q_nope_BTHN, q_rope_BTHP, latent_BSC, k_rope_BSP, ctx)
    return out_BTD, {'latent': latent_BSC, 'k_rope': k_rope_BSP}

  def _rope(self, x_BTHP, positions_BT, layer):
    # DeepSeek's checkpoints pair dims (2i, 2i + 1). transformers returns the rotated evens then
    # odds, lm keeps the pairs in place: the same permutation of q's and k's rope dims, so the
    # same q · k.
    return apply_rope(x_BTHP, positions_BT, layer['inv_freq'], layer['rope_factor'],
                      interleaved=self.rope_interleaved)

  def _expanded(self, q_nope_BTHN, q_rope_BTHP, latent_BTC, k_rope_BT1P, ctx):
    """Per-head keys and values from the latents, through lm's attention."""
    _, N, _, V = self.dims
    kv_BTHX = self.kv_b(latent_BTC)  # X = N + V
    k_rope_BTHP = jnp.broadcast_to(k_rope_BT1P, (*kv_BTHX.shape[:3], k_rope_BT1P.shape[-1]))
    q_BTHQ = jnp.concatenate([q_nope_BTHN, q_rope_BTHP.astype(q_nope_BTHN.dtype)], axis=-1)
    k_BTHQ = jnp.concatenate([kv_BTHX[..., :N], k_rope_BTHP.astype(kv_BTHX.dtype)], axis=-1)
    v_BTHV = kv_BTHX[..., N:]
    implementation = self.implementation
    if implementation == 'auto':
      implementation = attention_lib.choose_implementation(q_BTHQ, k_BTHQ)
    width = max(q_BTHQ.shape[-1], V)
    if implementation != 'xla' and width != V:
      # The fused kernels take one head dim for q, k and v: zero value dims give zero outputs.
      v_BTHV = jnp.pad(v_BTHV, [(0, 0)] * 3 + [(0, width - V)])
    if implementation != 'xla' and width != q_BTHQ.shape[-1]:
      # Zero query/key dims leave every logit as it was.
      pad = [(0, 0)] * 3 + [(0, width - q_BTHQ.shape[-1])]
      q_BTHQ, k_BTHQ = jnp.pad(q_BTHQ, pad), jnp.pad(k_BTHQ, pad)

    def core(mask):
      return attention_lib.attention(q_BTHQ, k_BTHQ, v_BTHV, ctx.segment_ids_BT,
                                     implementation=implementation, causal=True, scale=self.scale,
                                     **_mask_args(mask))[..., :V]
    return self.o(self._per_mask(core, ctx.layer))

  def _absorbed(self, q_nope_BTHN, q_rope_BTHP, latent_BSC, k_rope_BSP, ctx):
    """Attention over the cached latents with kv_b folded into the queries and the output."""
    _, N, _, _ = self.dims
    w_CHX = self.kv_b.weight()  # with its LoRA adapter, dequantized under QLoRA
    w_key_CHN, w_value_CHV = w_CHX[..., :N], w_CHX[..., N:]
    q_latent_BTHC = jnp.einsum('bthn,chn->bthc', q_nope_BTHN, w_key_CHN)
    logits_BHTS = (
        jnp.einsum('bthc,bsc->bhts', q_latent_BTHC, latent_BSC, preferred_element_type=jnp.float32)
        + jnp.einsum('bthp,bsp->bhts', q_rope_BTHP, k_rope_BSP, preferred_element_type=jnp.float32)
    ) * self.scale
    B, T, S = q_nope_BTHN.shape[0], q_nope_BTHN.shape[1], latent_BSC.shape[1]

    def core(mask):
      mask_BTS = attention_lib.make_mask(
          B, T, S, ctx.segment_ids_BT, causal=True, q_positions_BT=ctx.positions_BT,
          kv_positions_BS=ctx.cache_positions, kv_segment_ids_BS=ctx.cache_segment_ids,
          **_mask_args(mask))
      masked = jnp.where(mask_BTS[:, None], logits_BHTS, jnp.finfo(jnp.float32).min)
      probs_BHTS = jax.nn.softmax(masked, axis=-1).astype(latent_BSC.dtype)
      out_latent_BTHC = jnp.einsum('bhts,bsc->bthc', probs_BHTS, latent_BSC)
      return jnp.einsum('bthc,chv->bthv', out_latent_BTHC, w_value_CHV)
    return self.o(self._per_mask(core, ctx.layer))

  def _per_mask(self, fn, layer):
    """fn(mask) with this layer's mask: static when all layers share it, else a switch between
    one static-mask branch per kind (as lm.model.mixers.attention.Attention does)."""
    if len(self.masks) == 1:
      return fn(self.masks[0])
    return jax.lax.switch(layer['mask'], [functools.partial(fn, m) for m in self.masks])
