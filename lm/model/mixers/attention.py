"""Softmax attention as a token mixer: grouped-query projections, RoPE, and the options the
families differ in, all per model except the mask and the RoPE table, which are per layer.

Per model: q/k/v biases and an output bias; q/k RMSNorm per head (Qwen3, Gemma 3) or over all
heads at once (OLMo 2/3, `qk_norm_scope='all'`); partial RoPE (`partial_rotary_factor`); a
sigmoid output gate per head and dim computed from the input (Qwen3.5, Qwen3-Next:
`attn_output_gate`); Gemma's own logit scale and soft-cap.

Also per model: learned attention sinks (gpt-oss: `attn_sinks`), interleaved RoPE pairs
(`rope_interleaved`), and Llama 4's weightless q/k RMSNorm after RoPE on RoPE layers
(`qk_l2_norm`) and query temperature on NoPE layers (`attn_temperature_floor_scale`,
`attn_temperature_scale`: q · (1 + scale · log(1 + floor((position + 1) / floor_scale)))).

Per layer (scanned values in `ctx.layer`, so layers that differ only there share one stack):
the mask kind ('full', 'sliding' window, 'chunked' local attention) as an index into the model's
static mask kinds, the RoPE table (all zeros on NoPE layers) and whether the layer rotates.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import head_dim
from lm.model import attention as attention_lib
from lm.model.layers import Linear, RMSNorm, param
from lm.model.rope import apply_rope


def mask_kinds(cfg) -> tuple:
  """The distinct static masks of the model's attention layers, as (kind, size) pairs, in a
  fixed order; each layer's `ctx.layer['mask']` indexes this tuple."""
  kinds = []
  for layer_type in cfg.layer_types or ('sliding',) * cfg.n_layers:
    if layer_type == 'linear':
      continue
    if layer_type == 'sliding' and cfg.sliding_window:
      kind = ('sliding', int(cfg.sliding_window))
    elif layer_type == 'chunked':
      kind = ('chunked', int(cfg.attention_chunk_size))
    else:
      kind = ('full', 0)
    if kind not in kinds:
      kinds.append(kind)
  return tuple(sorted(kinds)) or (('full', 0),)


def mask_index(cfg, layer_type: str) -> int:
  kinds = mask_kinds(cfg)
  if layer_type == 'sliding' and cfg.sliding_window:
    return kinds.index(('sliding', int(cfg.sliding_window)))
  if layer_type == 'chunked':
    return kinds.index(('chunked', int(cfg.attention_chunk_size)))
  return kinds.index(('full', 0)) if ('full', 0) in kinds else 0


class Attention(nnx.Module):
  """x_BTD -> attention output [B, T, D]; with a cache, also the updated {'k', 'v'}."""

  stack_name = 'attn'

  def __init__(self, cfg, *, rngs):
    D, H, G, K = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, head_dim(cfg)
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    self.q = lin((D,), (H, K), ('embed',), ('heads', 'head_dim'), use_bias=cfg.qkv_bias,
                 name='layers.attn.q')
    self.k = lin((D,), (G, K), ('embed',), ('kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
                 name='layers.attn.k')
    self.v = lin((D,), (G, K), ('embed',), ('kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
                 name='layers.attn.v')
    self.o = lin((H, K), (D,), ('heads', 'head_dim'), ('embed',), use_bias=cfg.attn_out_bias,
                 name='layers.attn.o')
    if cfg.attn_output_gate:
      self.gate = lin((D,), (H, K), ('embed',), ('heads', 'head_dim'), use_bias=cfg.qkv_bias,
                      name='layers.attn.gate')
    if cfg.qk_norm:
      every_head = cfg.qk_norm_scope == 'all'
      q_shape, k_shape = ((H, K), (G, K)) if every_head else (K, K)
      q_axes, k_axes = (('heads', 'head_dim'), ('kv_heads', 'head_dim')) if every_head else (
          'head_dim', 'head_dim')
      self.q_norm = RMSNorm(q_shape, cfg=cfg, rngs=rngs, axis=q_axes)
      self.k_norm = RMSNorm(k_shape, cfg=cfg, rngs=rngs, axis=k_axes)
    if cfg.attn_sinks:
      self.sinks = param(rngs, nnx.initializers.normal(stddev=0.02), (H,), ('heads',),
                         jnp.dtype(cfg.param_dtype))
    self.has_sinks = cfg.attn_sinks
    self.qk_norm = cfg.qk_norm
    self.qk_l2_norm = cfg.qk_l2_norm
    self.norm_eps = cfg.norm_eps
    self.temperature = (cfg.attn_temperature_floor_scale, cfg.attn_temperature_scale)
    self.interleaved = cfg.rope_interleaved
    self.output_gate = cfg.attn_output_gate
    self.implementation = cfg.attention
    self.masks = mask_kinds(cfg)
    unfused = [what for what, used in (('attention sinks', cfg.attn_sinks),
                                       ('chunked attention', ('chunked', cfg.attention_chunk_size)
                                        in self.masks)) if used]
    if cfg.attention in ('pallas', 'cudnn') and unfused:
      # The fused kernels take neither; lm.model.attention.attention runs these layers in XLA.
      print(f"lm: notice: model.attention='{cfg.attention}' does not support {unfused[0]}; those "
            'layers run the XLA attention', file=sys.stderr)
    self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
    self.softcap = cfg.attn_logit_softcap or None

  @staticmethod
  def init_cache(cfg, batch_size: int, max_len: int, dtype) -> dict:
    shape = (batch_size, max_len, cfg.n_kv_heads, head_dim(cfg))
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  @staticmethod
  def cache_axes() -> dict:
    axes = ('batch', 'length', 'kv_heads', 'head_dim')
    return {'k': axes, 'v': axes}

  def __call__(self, x_BTD, ctx, cache=None):
    layer, positions_BT, segment_ids_BT = ctx.layer, ctx.positions_BT, ctx.segment_ids_BT
    q_BTHK, k_BTGK = self.q(x_BTD), self.k(x_BTD)
    if self.qk_norm:
      q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
    rotate = functools.partial(apply_rope, positions_BT=positions_BT, inv_freq=layer['inv_freq'],
                               factor=layer['rope_factor'], interleaved=self.interleaved)
    q_BTHK, k_BTGK = rotate(q_BTHK), rotate(k_BTGK)
    q_BTHK, k_BTGK = self._llama4_options(q_BTHK, k_BTGK, positions_BT, layer['rope'])
    v_BTGK = self.v(x_BTD)
    sinks = {'sinks': self.sinks[...]} if self.has_sinks else {}
    if cache is None:
      def core(mask):
        return attention_lib.attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT,
                                       implementation=self.implementation, causal=True,
                                       scale=self.scale, softcap=self.softcap, **sinks,
                                       **_mask_args(mask))
      return self._out(self._per_mask(core, layer), x_BTD), None
    # Decoding: write this step's keys/values at slot `index`, attend over the whole cache. The
    # cache's positions and segment ids (0 = empty or padding) already include this step's.
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), ctx.index, 1)
    k_BSGK, v_BSGK = write(cache['k'], k_BTGK), write(cache['v'], v_BTGK)

    def cached(mask):
      return attention_lib.xla_attention(
          q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, causal=True, scale=self.scale,
          softcap=self.softcap, q_positions_BT=positions_BT, kv_positions_BS=ctx.cache_positions,
          kv_segment_ids_BS=ctx.cache_segment_ids, **sinks, **_mask_args(mask))
    return self._out(self._per_mask(cached, layer), x_BTD), {'k': k_BSGK, 'v': v_BSGK}

  def _llama4_options(self, q_BTHK, k_BTGK, positions_BT, rotates):
    """Llama 4: weightless RMSNorm of q and k on RoPE layers; query temperature on NoPE ones."""
    if self.qk_l2_norm:
      def rms(x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.norm_eps)
        return jnp.where(rotates > 0, normed, x32).astype(x.dtype)
      q_BTHK, k_BTGK = rms(q_BTHK), rms(k_BTGK)
    floor_scale, scale = self.temperature
    if floor_scale:
      t_BT = jnp.log1p(jnp.floor((positions_BT.astype(jnp.float32) + 1.0) / floor_scale)) * scale + 1.0
      t_BT = jnp.where(rotates > 0, 1.0, t_BT)
      q_BTHK = (q_BTHK.astype(jnp.float32) * t_BT[:, :, None, None]).astype(q_BTHK.dtype)
    return q_BTHK, k_BTGK

  def _out(self, attended_BTHK, x_BTD):
    if self.output_gate:
      gate_BTHK = jax.nn.sigmoid(self.gate(x_BTD).astype(jnp.float32))
      attended_BTHK = (attended_BTHK.astype(jnp.float32) * gate_BTHK).astype(attended_BTHK.dtype)
    return self.o(attended_BTHK)

  def _per_mask(self, fn, layer):
    """fn(mask) with this layer's mask: static when all layers share it, else a switch between
    one static-mask branch per kind (so fused kernels keep their static masks)."""
    if len(self.masks) == 1:
      return fn(self.masks[0])
    return jax.lax.switch(layer['mask'], [functools.partial(fn, m) for m in self.masks])


def _mask_args(mask) -> dict:
  kind, size = mask
  return {'window': size} if kind == 'sliding' else {'chunk': size} if kind == 'chunked' else {}
