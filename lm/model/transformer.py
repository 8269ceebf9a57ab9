"""A Llama-family decoder-only transformer in Flax NNX.

One class covers Llama 2/3, Mistral, Qwen2/3, Phi-3/4 and Gemma 1/2/3 through configuration (RoPE
scaling, grouped-query attention, biases, q/k norms, tied embeddings, sliding windows, Gemma's
(1 + scale) norms, post-norms, soft-caps, sqrt(D) embedding scale and GeGLU MLP). Layers are
created stacked (leading `layers` axis) and run with `lax.scan`, so compile time does not grow with
depth; `scan_layers=False` unrolls the same stacked parameters, so checkpoints are interchangeable
between the two. The default (None) unrolls stacks of up to UNROLL_MAX_LAYERS layers
(`scans_layers`). Layers that differ in kind (Gemma's sliding and full attention, each with its
own RoPE) stay one scan: their RoPE tables and window choice are per-layer scanned inputs.

Every parameter carries logical axis names (`out_sharding`); lm/sharding.py maps them to the mesh.
Shape suffixes: B batch, T length, D d_model, H query heads, G kv heads, K head dim, F mlp, V vocab.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.model import attention as attention_lib
from lm.model import moe as moe_lib
from lm.model.contract import contract, lora_contract
from lm.config import ROPE_SCALING_TYPES, head_dim, n_experts
from lm.errors import ConfigError
from lm.model import precision
from lm.model import quant

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs, init, shape, axes, dtype):
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


# A shallow stack runs faster unrolled and compiles no slower. On CPU, at configs/bench_tiny.py's
# shape with 2/4/8/16 layers (docs/pretraining.md), the step took 328/490/825/1663 ms unrolled
# against 409/587/1046/1848 ms scanned: the scan zero-fills stacked buffers for every layer's
# residuals and moves them in and out by dynamic slices. But unrolled, compile time grows with
# depth: the first step took 4.5/5.2/8.5/11.9 s against 5.3/5.9/5.8/6.7 s scanned. Up to 4 layers
# unrolling costs no compile time, so it is the default there.
UNROLL_MAX_LAYERS = 4


def scans_layers(cfg) -> bool:
  """Whether the layers run as one lax.scan: `model.scan_layers`, or when it is None (the
  default), whether there are more than UNROLL_MAX_LAYERS of them."""
  choice = getattr(cfg, 'scan_layers', None)
  return cfg.n_layers > UNROLL_MAX_LAYERS if choice is None else bool(choice)


class Linear(nnx.Module):
  """y = x · W (+ b), contracting x's last len(in_shape) dims with W's leading dims.

  When `model.lora.rank` > 0 and `model.lora.targets` matches `name` (e.g. 'layers.attn.q'), the
  layer also holds a low-rank adapter: y += scale · (dropout(x) · A) · B, with A [*in, r] and
  B [r, *out]. B starts at zero, so an adapted model starts as exactly its base model.
  """

  def __init__(self, in_shape, out_shape, in_axes, out_axes, *, use_bias=False, init_std=None,
               name='', cfg, rngs):
    init = nnx.initializers.normal(stddev=init_std or math.prod(in_shape) ** -0.5)
    self.n_in = len(in_shape)
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    dtype = jnp.dtype(cfg.param_dtype)
    self.kernel = _param(rngs, init, (*in_shape, *out_shape), (*in_axes, *out_axes), dtype)
    self.bias = (_param(rngs, nnx.initializers.zeros, tuple(out_shape), tuple(out_axes),
                        dtype) if use_bias else None)
    lora = cfg.lora
    self.lora_rank = lora.rank if lora.rank and re.search(lora.targets, name) else 0
    if self.lora_rank:
      r = self.lora_rank
      # A as PEFT initialises it (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))); B zero.
      bound = math.prod(in_shape) ** -0.5
      uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
      self.lora_a = _param(rngs, uniform, (*in_shape, r), (*in_axes, None), dtype)
      self.lora_b = _param(rngs, nnx.initializers.zeros, (r, *out_shape), (None, *out_axes), dtype)
      self.lora_scale = lora.alpha / (math.sqrt(r) if lora.rslora else r)
      self.lora_dropout = lora.dropout
    # Per call, set by Transformer.__call__: adapters on/off, and the key for adapter dropout.
    self.adapters = True
    self.dropout_key = None

  def __call__(self, x):
    # A QLoRA base kernel arrives quantized (lm/model/quant.py) and is dequantized here, per layer.
    w = precision.to_compute_dtype(quant.as_array(self.kernel.get_value()), self.compute_dtype)
    x = x.astype(self.compute_dtype)
    lora = bool(self.lora_rank and self.adapters)
    dropout = lora and self.lora_dropout and self.dropout_key is not None
    # float32 without dropout: x · (W + A·B) in one matmul (lm/model/contract.py, lora_contract).
    merged = lora and not dropout and self.compute_dtype == jnp.float32
    y = lora_contract(x, w, *self._adapter(), self.n_in) if merged else contract(x, w, self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    if lora and not merged:
      if dropout:
        keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0.0).astype(x.dtype)
      a, b = self._adapter()
      y = y + contract(contract(x, a, self.n_in), b, 1)
    return y

  def _adapter(self):
    """(A, B · scale) in the compute dtype: the scale goes on B [r, *out], not on a [B, T, *out]
    product."""
    return (self.lora_a[...].astype(self.compute_dtype),
            (self.lora_b[...] * self.lora_scale).astype(self.compute_dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) · (offset + scale): offset 0 (Llama, scale starts at 1) or 1 (Gemma, scale at 0)."""

  def __init__(self, dim, *, cfg, rngs, axis='embed'):
    del rngs
    self.eps = cfg.norm_eps
    self.offset = cfg.norm_offset
    init = jnp.zeros if self.offset else jnp.ones
    self.scale = nnx.Param(init((dim,), jnp.dtype(cfg.param_dtype)), out_sharding=(axis,),
                           eager_sharding=False)

  def __call__(self, x_BTD):
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x_BTD.dtype)


def rope(cfg, *, local: bool = False) -> tuple[np.ndarray, float]:
  """(inverse frequencies [K/2] float32, attention factor) as transformers computes them.

  `rope_scaling['type']`: llama3 (the default, for configs that predate the key), linear
  (positions / factor) or yarn (NTK-by-parts with its cos/sin factor). `local`: the table of
  'sliding' layers, which is unscaled RoPE at `rope_local_theta` when that is set (Gemma 3).
  """
  K = head_dim(cfg)
  theta, scaling = cfg.rope_theta, cfg.rope_scaling
  if local and cfg.rope_local_theta:
    theta, scaling = cfg.rope_local_theta, None
  exponents = np.arange(0, K, 2, dtype=np.float32) / np.float32(K)
  pos_freqs = np.float32(theta) ** exponents
  inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
  if not scaling:
    return inv_freq, 1.0
  kind = scaling.get('type', 'llama3')
  factor = float(scaling['factor'])
  if kind == 'linear':
    return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
  if kind == 'llama3':
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    old_len = scaling['original_max_seq_len']
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = old_len / low, old_len / high
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor,
                        np.where(wavelen < high_wavelen, inv_freq, smoothed))
    return inv_freq.astype(np.float32), 1.0
  if kind == 'yarn':
    return _yarn(scaling, K, theta, pos_freqs, factor)
  raise ConfigError(f'model.rope_scaling type {kind!r} is not supported; lm implements '
                    f'{", ".join(ROPE_SCALING_TYPES)} (or None for unscaled RoPE)')


def _yarn(scaling, K, theta, pos_freqs, factor):
  """YaRN, step for step as transformers' _compute_yarn_parameters (float32 tables)."""
  def get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0
  attention_factor = scaling.get('attention_factor')
  mscale, mscale_all_dim = scaling.get('mscale'), scaling.get('mscale_all_dim')
  if attention_factor is None:
    if mscale and mscale_all_dim:
      attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
    else:
      attention_factor = get_mscale(factor)
  beta_fast, beta_slow = scaling.get('beta_fast') or 32, scaling.get('beta_slow') or 1
  old_len = scaling['original_max_seq_len']
  correction = lambda rotations: K * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))
  low, high = correction(beta_fast), correction(beta_slow)
  if scaling.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, K - 1)
  if low == high:
    high += 0.001  # as transformers: no division by zero
  ramp = np.clip((np.arange(K // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
  extrapolation = (np.float32(1) - ramp).astype(np.float32)
  interpolated = np.float32(1.0) / (np.float32(factor) * pos_freqs)
  extrapolated = np.float32(1.0) / pos_freqs
  inv_freq = interpolated * (1 - extrapolation) + extrapolated * extrapolation
  return inv_freq.astype(np.float32), float(attention_factor)


def rope_frequencies(cfg) -> jnp.ndarray:
  """Inverse frequencies [K/2] of the full-attention layers."""
  return jnp.asarray(rope(cfg)[0])


def layer_inputs(cfg) -> tuple[dict, tuple]:
  """Per-layer values scanned with the layers, and the distinct window sizes they index.

  {'inv_freq': [L, K/2], 'rope_factor': [L], 'window': [L] index into windows}; windows holds
  None (no window) and/or `sliding_window`, so each layer's attention runs with a static window.
  """
  L = cfg.n_layers
  kinds = tuple(cfg.layer_types) or ('sliding',) * L
  tables = {kind: rope(cfg, local=kind == 'sliding') for kind in set(kinds)}
  per_layer = [cfg.sliding_window if kind == 'sliding' and cfg.sliding_window else None
               for kind in kinds]
  windows = tuple(sorted(set(per_layer), key=lambda w: w or 0))
  return {'inv_freq': np.stack([tables[k][0] for k in kinds]),
          'rope_factor': np.asarray([tables[k][1] for k in kinds], np.float32),
          'window': np.asarray([windows.index(w) for w in per_layer], np.int32)}, windows


def apply_rope(x_BTHK, positions_BT, inv_freq, factor=1.0):
  """Rotates halves (the Hugging Face Llama layout, so imported weights need no permutation).
  `factor` scales cos and sin (YaRN's attention factor)."""
  angles_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = (jnp.cos(angles_BTk) * factor)[:, :, None]
  sin = (jnp.sin(angles_BTk) * factor)[:, :, None]
  x1, x2 = jnp.split(x_BTHK.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


class Attention(nnx.Module):

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
    if cfg.qk_norm:
      self.q_norm = RMSNorm(K, cfg=cfg, rngs=rngs, axis='head_dim')
      self.k_norm = RMSNorm(K, cfg=cfg, rngs=rngs, axis='head_dim')
    self.qk_norm = cfg.qk_norm
    self.implementation = cfg.attention
    self.windows = layer_inputs(cfg)[1]
    self.scale = cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar else None
    self.softcap = cfg.attn_logit_softcap or None

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, layer, cache=None):
    """layer: this layer's scanned inputs (lm.model.transformer.layer_inputs)."""
    q_BTHK, k_BTGK = self.q(x_BTD), self.k(x_BTD)
    if self.qk_norm:
      q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
    q_BTHK = apply_rope(q_BTHK, positions_BT, layer['inv_freq'], layer['rope_factor'])
    k_BTGK = apply_rope(k_BTGK, positions_BT, layer['inv_freq'], layer['rope_factor'])
    v_BTGK = self.v(x_BTD)
    if cache is None:
      def core(window):
        return attention_lib.attention(q_BTHK, k_BTGK, v_BTGK, segment_ids_BT,
                                       implementation=self.implementation, causal=True,
                                       window=window, scale=self.scale, softcap=self.softcap)
      return self.o(self._per_window(core, layer)), None
    # Decoding: write this step's keys/values at slot `index`, attend over the whole cache. The
    # cache's positions and segment ids (0 = empty or padding) already include this step's.
    write = lambda c, new: jax.lax.dynamic_update_slice_in_dim(c, new.astype(c.dtype), cache['index'], 1)
    k_BSGK, v_BSGK = write(cache['k'], k_BTGK), write(cache['v'], v_BTGK)

    def cached(window):
      return attention_lib.xla_attention(
          q_BTHK, k_BSGK, v_BSGK, segment_ids_BT, causal=True, window=window, scale=self.scale,
          softcap=self.softcap, q_positions_BT=positions_BT, kv_positions_BS=cache['positions'],
          kv_segment_ids_BS=cache['segment_ids'])
    return self.o(self._per_window(cached, layer)), {'k': k_BSGK, 'v': v_BSGK}

  def _per_window(self, fn, layer):
    """fn(window) with this layer's window: static when all layers share it, else a switch
    between one static-window branch per size (so fused kernels keep their static masks)."""
    if len(self.windows) == 1:
      return fn(self.windows[0])
    return jax.lax.switch(layer['window'], [functools.partial(fn, w) for w in self.windows])


ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
  """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU with silu (Llama), GeGLU with gelu_tanh (Gemma)."""

  def __init__(self, cfg, *, rngs):
    D, F = cfg.d_model, cfg.mlp_dim
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    bias = cfg.mlp_bias
    self.gate = lin((D,), (F,), ('embed',), ('mlp',), use_bias=bias, name='layers.mlp.gate')
    self.up = lin((D,), (F,), ('embed',), ('mlp',), use_bias=bias, name='layers.mlp.up')
    self.down = lin((F,), (D,), ('mlp',), ('embed',), use_bias=bias, name='layers.mlp.down')
    self.activation = cfg.mlp_activation

  def __call__(self, x_BTD):
    return self.down(ACTIVATIONS[self.activation](self.gate(x_BTD)) * self.up(x_BTD))


class Block(nnx.Module):
  """Pre-norm residual block; with `post_norms` (Gemma 2/3) each branch's output is normed too."""

  def __init__(self, cfg, *, rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)
    self.mlp = moe_lib.MoE(cfg, rngs=rngs) if n_experts(cfg) else MLP(cfg, rngs=rngs)
    if cfg.post_norms:
      self.attn_post_norm = RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)
      self.mlp_post_norm = RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)
    self.post_norms = cfg.post_norms

  def __call__(self, x_BTD, positions_BT, segment_ids_BT, layer, cache=None):
    """-> (x_BTD, cache, router stats: None for a dense MLP)."""
    h_BTD, cache = self.attn(self.attn_norm(x_BTD), positions_BT, segment_ids_BT, layer, cache)
    if self.post_norms:
      h_BTD = self.attn_post_norm(h_BTD)
    x_BTD = x_BTD + h_BTD
    stats = None
    if isinstance(self.mlp, moe_lib.MoE):
      mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
      h_BTD, stats = self.mlp(self.mlp_norm(x_BTD), mask_BT)
    else:
      h_BTD = self.mlp(self.mlp_norm(x_BTD))
    if self.post_norms:
      h_BTD = self.mlp_post_norm(h_BTD)
    return x_BTD + h_BTD, cache, stats


class Transformer(nnx.Module):
  """tokens_BT -> logits_BTV (float32); with a KV cache, -> (logits_BTV, updated cache).

  `adapters=False` runs the base model with every LoRA adapter switched off (the DPO reference of a
  LoRA run). `dropout_key` (set by ModelSpec.bind in training) drives adapter dropout; `reference`
  (set by ModelSpec.bind when the state carries `ref.*` weights) is a frozen copy for DPO.

  The cache (lm/eval/generate.py builds it) is {'k', 'v': [L, B, S, G, K], 'positions',
  'segment_ids': [B, S] already holding this call's tokens, 'index': slot of this call's first
  token}; its per-layer k/v travel through the layer scan as inputs and outputs.

  With experts (model.moe.n_experts > 0), a call without a cache that runs the adapters (the
  trained policy, not a DPO reference pass) adds its {'load_balancing', 'router_z'} losses to
  `router_losses` and counts itself in `router_calls`; lm/train/objectives.py reads them.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.d_model, cfg.vocab_size
    # Small output-side inits make the initial prediction near uniform: loss ~= log(V).
    self.embed = _param(rngs, nnx.initializers.normal(stddev=0.02), (V, D), ('vocab', 'embed'),
                        jnp.dtype(cfg.param_dtype))

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_layers(rngs):
      return Block(cfg, rngs=rngs)

    self.layers = make_layers(rngs)
    self.final_norm = RMSNorm(D, cfg=cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        (D,), (V,), ('embed',), ('vocab',), init_std=0.02, name='lm_head', cfg=cfg, rngs=rngs)
    self.dropout_key = None
    self.reference = None
    self.teacher = None  # a frozen teacher for distillation (ModelSpec.bind, `teacher.*` weights)
    self.router_losses = nnx.data(None)
    self.router_calls = 0

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, *,
               adapters=True):
    x_BTD, kv = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache,
                                   adapters=adapters)
    if self.lm_head is None:
      project, weights, _ = self.unembedding(adapters=adapters)
      logits_BTV = project(weights, x_BTD)
    else:  # through the Linear, so an adapted lm_head keeps its adapter dropout
      _configure_adapters(self.lm_head, adapters, self._head_key(adapters))
      logits_BTV = _final_logits(self.lm_head(x_BTD), self.cfg.final_logit_softcap)
    if cache is None:
      return logits_BTV
    return logits_BTV, {**cache, **kv}

  def _layer_keys(self, adapters):
    """Adapter-dropout keys: [0] for lm_head, [1:] one per layer; None without dropout."""
    key = self.dropout_key if adapters else None
    return None if key is None else jax.random.split(key, self.cfg.n_layers + 1)

  def _head_key(self, adapters):
    keys = self._layer_keys(adapters)
    return None if keys is None else keys[0]

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, *,
                    adapters=True):
    """The final-normed hidden states [B, T, D] in the compute dtype, and the updated per-layer
    k/v (None without a cache): everything but the unembedding."""
    cfg = self.cfg
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embed = self.embed[...]
    x_BTD = jnp.take(embed, tokens_BT, axis=0)
    if cfg.embed_scale:  # Gemma: the scale is rounded to the weights' dtype, as in HF
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), embed.dtype)
    x_BTD = x_BTD.astype(compute_dtype)
    per_layer = jax.tree.map(jnp.asarray, layer_inputs(cfg)[0])

    graphdef, stacked = nnx.split(self.layers)
    layer_keys = self._layer_keys(adapters)

    kv = None if cache is None else {'k': cache['k'], 'v': cache['v']}
    shared = None if cache is None else {k: v for k, v in cache.items() if k not in ('k', 'v')}

    def layer(x_BTD, xs):
      layer_params, layer_key, layer_kv, layer_values = xs
      block = nnx.merge(graphdef, layer_params)
      _configure_adapters(block, adapters, layer_key)
      layer_cache = None if layer_kv is None else {**layer_kv, **shared}
      x_BTD, layer_cache, stats = block(x_BTD, positions_BT, segment_ids_BT, layer_values, layer_cache)
      return x_BTD, (layer_cache, stats)

    scan = scans_layers(cfg)
    if cfg.remat != 'none' and cache is None:
      layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not scan)
    xs = (stacked, None if layer_keys is None else layer_keys[1:], kv, per_layer)
    if scan:
      x_BTD, (kv, stats) = jax.lax.scan(layer, x_BTD, xs)
    else:
      outs = []
      for i in range(cfg.n_layers):
        x_BTD, out = layer(x_BTD, jax.tree.map(lambda a, i=i: a[i], xs))
        outs.append(out)
      kv, stats = jax.tree.map(lambda *a: jnp.stack(a), *outs) if outs else (None, None)
    if stats is not None and cache is None and adapters:
      losses = moe_lib.router_losses(stats)
      if self.router_losses is not None:
        losses = jax.tree.map(jnp.add, self.router_losses, losses)
      self.router_losses, self.router_calls = nnx.data(losses), self.router_calls + 1
    return self.final_norm(x_BTD), kv

  def unembedding(self, *, adapters=True):
    """(project, weights, axes): `project(weights, x_BTD)` gives the float32 logits and is a pure
    function of its arguments, so a loss can run it chunk by chunk (lm/train/losses.py); `axes`
    are the weights' logical axis names.

    None when lm_head carries a LoRA adapter with dropout in training: that head is no single
    matrix, and callers fall back to the whole logits.
    """
    compute_dtype = jnp.dtype(self.cfg.compute_dtype)
    if self.lm_head is None:
      weights, spec, axes = self.embed[...], 'btd,vd->btv', ('vocab', 'embed')
    else:
      head = self.lm_head
      # A QLoRA kernel arrives quantized (lm/model/quant.py): dequantized as Linear does.
      weights, spec, axes = quant.as_array(head.kernel.get_value()), 'btd,dv->btv', ('embed', 'vocab')
      if head.lora_rank and adapters:
        if head.lora_dropout and self._head_key(adapters) is not None:
          return None
        weights = weights + jnp.tensordot(head.lora_a[...], head.lora_b[...] * head.lora_scale, 1)
    softcap = self.cfg.final_logit_softcap

    def project(w, x_BTD):
      logits = jnp.einsum(spec, x_BTD.astype(compute_dtype), w.astype(compute_dtype))
      return _final_logits(logits, softcap)

    return project, weights, axes


def _final_logits(logits_BTV, softcap=0.0):
  """Logits as the losses and decoding see them: float32, with Gemma 2/3's final soft cap
  (cap * tanh(logits / cap)) when set. Both the whole-logits call and the chunked loss
  (unembedding's `project`) go through here, so the chunked loss is exact for Gemma too."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  if softcap:
    logits_BTV = softcap * jnp.tanh(logits_BTV / softcap)
  return logits_BTV


def _configure_adapters(module, adapters: bool, key) -> None:
  """Sets the per-call adapter switch and dropout key on every Linear in `module`."""
  linears = [m for _, m in nnx.iter_modules(module)
             if isinstance(m, (Linear, moe_lib.ExpertLinear)) and m.lora_rank]
  keys = [None] * len(linears) if key is None else list(jax.random.split(key, max(len(linears), 1)))
  for linear, k in zip(linears, keys):
    linear.adapters, linear.dropout_key = adapters, nnx.data(k)
