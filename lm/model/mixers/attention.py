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

Gemma 4 adds three variants, each a part of its own because its parameters differ:
`GlobalAttention` for the 'full' layers (their own head dim and KV heads, `global_head_dim`,
`global_kv_heads`; with `attn_k_eq_v` the values are the keys' projection, no v weights), and
`ReusedKVAttention` / `ReusedKVGlobalAttention` for the last `kv_shared_layers` layers, which
have queries and an output only and attend over the keys and values of the last earlier layer of
their kind. Those travel beside the residual stream (`ctx.shared_kv`, the layer scan's carry):
every attention layer of a model with KV sharing leaves its keys and values there (in decoding,
its whole updated cache), so the last one before the shared layers is what they read. Values
may be RMS-normalised without weights (`v_norm`).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from lm.config import global_attention_layers, head_dim
from lm.model import attention as attention_lib
from lm.model.layers import Linear, RMSNorm, param, weightless_rms_norm
from lm.model import rope as rope_lib
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


def layer_head_dim(cfg, layer_type: str) -> int:
  """The head dim of attention layers of `layer_type` ('full' layers may have their own)."""
  if layer_type == 'full' and global_attention_layers(cfg):
    return GlobalAttention.dims(cfg)[1]
  return head_dim(cfg)


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
  full_layers = False  # the 'full' layers' own dims and keys-as-values (GlobalAttention)
  kv_source = None  # the stack whose keys and values this part reuses (ReusedKVAttention)

  @classmethod
  def dims(cls, cfg) -> tuple[int, int]:
    """(KV heads, head dim) of this part's layers."""
    if cls.full_layers:
      return cfg.global_kv_heads or cfg.n_kv_heads, cfg.global_head_dim or head_dim(cfg)
    return cfg.n_kv_heads, head_dim(cfg)

  def __init__(self, cfg, *, rngs):
    (G, K), D, H = self.dims(cfg), cfg.d_model, cfg.n_heads
    name = 'layers.' + self.stack_name
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    self.q = lin((D,), (H, K), ('embed',), ('heads', 'head_dim'), use_bias=cfg.qkv_bias,
                 name=name + '.q')
    self.keys_are_values = self.full_layers and cfg.attn_k_eq_v
    if self.kv_source is None:
      self.k = lin((D,), (G, K), ('embed',), ('kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
                   name=name + '.k')
      if not self.keys_are_values:
        self.v = lin((D,), (G, K), ('embed',), ('kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
                     name=name + '.v')
    self.o = lin((H, K), (D,), ('heads', 'head_dim'), ('embed',), use_bias=cfg.attn_out_bias,
                 name=name + '.o')
    if cfg.attn_output_gate:
      self.gate = lin((D,), (H, K), ('embed',), ('heads', 'head_dim'), use_bias=cfg.qkv_bias,
                      name=name + '.gate')
    if cfg.qk_norm:
      every_head = cfg.qk_norm_scope == 'all'
      q_shape, k_shape = ((H, K), (G, K)) if every_head else (K, K)
      q_axes, k_axes = (('heads', 'head_dim'), ('kv_heads', 'head_dim')) if every_head else (
          'head_dim', 'head_dim')
      self.q_norm = RMSNorm(q_shape, cfg=cfg, rngs=rngs, axis=q_axes)
      if self.kv_source is None:
        self.k_norm = RMSNorm(k_shape, cfg=cfg, rngs=rngs, axis=k_axes)
    self.v_norm = cfg.v_norm
    self.shares_kv = bool(cfg.kv_shared_layers)
    self.rotary_half = rope_lib.rotary_dim(cfg, K) // 2
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

  @classmethod
  def init_cache(cls, cfg, batch_size: int, max_len: int, dtype) -> dict:
    if cls.kv_source is not None:
      return {}  # it reads the cache of the layer it shares keys and values with
    shape = (batch_size, max_len, *cls.dims(cfg))
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  @classmethod
  def cache_axes(cls) -> dict:
    if cls.kv_source is not None:
      return {}
    axes = ('batch', 'length', 'kv_heads', 'head_dim')
    return {'k': axes, 'v': axes}

  def __call__(self, x_BTD, ctx, cache=None):
    layer, positions_BT = ctx.layer, ctx.positions_BT
    q_BTHK = self.q(x_BTD)
    if self.qk_norm:
      q_BTHK = self.q_norm(q_BTHK)
    # The table is as wide as the model's widest layers (Gemma 4's full layers have their own
    # head dim); this part rotates its own dims.
    rotate = functools.partial(apply_rope, positions_BT=positions_BT,
                               inv_freq=layer['inv_freq'][..., :self.rotary_half],
                               factor=layer['rope_factor'], interleaved=self.interleaved)
    q_BTHK = rotate(q_BTHK)
    sinks = {'sinks': self.sinks[...]} if self.has_sinks else {}
    if self.kv_source is not None:  # keys and values of an earlier layer: training or cache
      q_BTHK, _ = self._llama4_options(q_BTHK, None, positions_BT, layer['rope'])
      k_BSGK, v_BSGK = ctx.shared_kv[self.kv_source]
      return self._attend(q_BTHK, k_BSGK, v_BSGK, x_BTD, ctx, cache is not None, sinks), cache
    k_BTGK = self.k(x_BTD)
    v_BTGK = k_BTGK if self.keys_are_values else self.v(x_BTD)  # before k's norm and RoPE
    if self.qk_norm:
      k_BTGK = self.k_norm(k_BTGK)
    k_BTGK = rotate(k_BTGK)
    q_BTHK, k_BTGK = self._llama4_options(q_BTHK, k_BTGK, positions_BT, layer['rope'])
    if self.v_norm:
      v_BTGK = weightless_rms_norm(v_BTGK, self.norm_eps)
    if cache is None:
      if self.shares_kv:
        ctx.shared_kv[self.stack_name] = (k_BTGK, v_BTGK)
      return self._attend(q_BTHK, k_BTGK, v_BTGK, x_BTD, ctx, False, sinks), None
    # Decoding: write this step's keys/values at slot `index`, attend over the whole cache. The
    # cache's positions and segment ids (0 = empty or padding) already include this step's.
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), ctx.index, 1)
    k_BSGK, v_BSGK = write(cache['k'], k_BTGK), write(cache['v'], v_BTGK)
    if self.shares_kv:
      ctx.shared_kv[self.stack_name] = (k_BSGK, v_BSGK)
    return self._attend(q_BTHK, k_BSGK, v_BSGK, x_BTD, ctx, True, sinks), {'k': k_BSGK, 'v': v_BSGK}

  def _attend(self, q_BTHK, k_BSGK, v_BSGK, x_BTD, ctx, decoding, sinks):
    """The output of queries over keys and values of this call (training) or of the whole cache
    (decoding: its positions and segment ids are the context's)."""
    layer, positions_BT, segment_ids_BT = ctx.layer, ctx.positions_BT, ctx.segment_ids_BT
    if not decoding:
      def core(mask):
        return attention_lib.attention(q_BTHK, k_BSGK, v_BSGK, segment_ids_BT,
                                       implementation=self.implementation, causal=True,
                                       scale=self.scale, softcap=self.softcap, **sinks,
                                       **_mask_args(mask))
      return self._out(self._per_mask(core, layer), x_BTD)

    def cached(mask):
      return attention_lib.xla_attention(
          q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, causal=True, scale=self.scale,
          softcap=self.softcap, q_positions_BT=positions_BT, kv_positions_BS=ctx.cache_positions,
          kv_segment_ids_BS=ctx.cache_segment_ids, **sinks, **_mask_args(mask))
    return self._out(self._per_mask(cached, layer), x_BTD)

  def _llama4_options(self, q_BTHK, k_BTGK, positions_BT, rotates):
    """Llama 4: weightless RMSNorm of q and k on RoPE layers; query temperature on NoPE ones."""
    if self.qk_l2_norm:
      def rms(x):
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.norm_eps)
        return jnp.where(rotates > 0, normed, x32).astype(x.dtype)
      q_BTHK, k_BTGK = rms(q_BTHK), None if k_BTGK is None else rms(k_BTGK)
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


class GlobalAttention(Attention):
  """Gemma 4's 'full' layers: their own head dim and KV heads, keys as values (attn_k_eq_v)."""
  stack_name = 'attn_global'
  full_layers = True


class ReusedKVAttention(Attention):
  """A KV-shared layer (Gemma 4 num_kv_shared_layers): queries and an output only, attending over
  the keys and values of the last earlier 'attn' layer."""
  stack_name = 'attn_reuse'
  kv_source = 'attn'


class ReusedKVGlobalAttention(Attention):
  """A KV-shared 'full' layer: over the keys and values of the last earlier 'attn_global' layer."""
  stack_name = 'attn_global_reuse'
  full_layers = True
  kv_source = 'attn_global'


def _mask_args(mask) -> dict:
  kind, size = mask
  return {'window': size} if kind == 'sliding' else {'chunk': size} if kind == 'chunked' else {}
