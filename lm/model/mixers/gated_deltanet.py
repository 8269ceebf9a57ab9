"""Gated DeltaNet: the token mixer of Qwen3-Next's and Qwen3.5's 'linear_attention' layers.

    q, k [B, T, G, K], v [B, T, H, V] = x · W_q, W_k, W_v   (G key heads, H value heads)
    q, k, v <- silu(causal depthwise conv over T, kernel W, within each document)
    q, k <- l2norm(q), l2norm(k)
    g = -exp(A_log) · softplus(x · W_a + dt_bias),  beta = sigmoid(x · W_b)      [B, T, H]
    o = gated delta rule (lm/model/kernels/gated_delta.py)                       [B, T, H, V]
    y = (RMSNorm_V(o) · silu(x · W_z)) · W_o

Sizes come from `cfg.linear_attn`: n_key_heads (G), n_value_heads (H), key_head_dim (K),
value_head_dim (V), conv_kernel (W); `implementation` ('auto' | 'xla' | 'pallas') if present.

Parameters (lm layout: kernels [*in, *out] with heads split out), with their logical axes:
  q.kernel, k.kernel [D, G, K]  (embed, kv_heads, head_dim)
  v.kernel, z.kernel [D, H, V]  (embed, heads, head_dim)
  b.kernel, a.kernel [D, H]     (embed, heads)
  o.kernel [H, V, D]            (heads, head_dim, embed)
  conv_q, conv_k [W, G, K]      (None, kv_heads, head_dim)
  conv_v [W, H, V]              (None, heads, head_dim)
  A_log, dt_bias [H]            (heads)
  norm.scale [V]                (head_dim; RMSNorm offset 0: the weight starts at 1)
q, k and v are separate projections (transformers fuses them: in_proj_qkv, in_proj_qkvz) so that
each kernel has its heads on their own axis, which tensor parallelism splits; the fused HF tensor
mixes q, k and v along one axis, which no mesh axis could split cleanly. Linear names are
'layers.linear_attn.{q,k,v,z,b,a,o}' for LoRA targets. A LoRA on HF's fused in_proj_qkv is one A
[D, r] with one B; ours are three adapters, which export exactly as one rank-3r adapter.

Hugging Face tensors (under model.layers.{i}.linear_attn.; `hf_tensors` gives the functions).
Both families:
  conv1d.weight [G·K + G·K + H·V, 1, W]: channels q | k | v, flattened (head, dim)
      -> conv_q, conv_k, conv_v: [W, heads, dim] = weight[channels, 0, :].T reshaped
  out_proj.weight [D, H·V]  -> o.kernel = weight.T reshaped [H, V, D]
  A_log [H], dt_bias [H], norm.weight [V] -> A_log, dt_bias, norm.scale as they are
Qwen3.5 (in_proj_qkv, in_proj_z, in_proj_b, in_proj_a), rows as the output features:
  in_proj_qkv.weight [2·G·K + H·V, D]: rows q | k | v -> q, k, v kernels = rows.T reshaped
  in_proj_z.weight [H·V, D] -> z.kernel;  in_proj_b.weight, in_proj_a.weight [H, D] -> b, a (.T)
Qwen3-Next (in_proj_qkvz, in_proj_ba), rows interleaved per key-head group g of R = H / G value
heads (transformers' fix_query_key_value_ordering):
  in_proj_qkvz.weight [G·(2K + 2RV), D]: group g's rows are q_g (K) | k_g (K) | v (R·V) | z (R·V),
      the v and z rows being value heads g·R .. g·R + R - 1
  in_proj_ba.weight [G·2R, D]: group g's rows are b (R) | a (R) for value heads g·R ..

Packed sequences (ctx.segment_ids_BT, 0 = padding): padding tokens' inputs are zeroed (as
transformers' apply_mask_to_padding_states), the conv does not reach across documents, and the
delta rule resets its state at each document and passes it through padding unchanged.

Cache (decoding): {'conv': [B, G·K + G·K + H·V, W - 1] the last W - 1 conv inputs, channels as
HF's conv1d; 'state': [B, H, K, V] float32}. A cached call takes T >= 1 new tokens (T > 1: the
chunked form from the cached state; T = 1: the recurrent step); the cached tokens are taken to
belong to the new tokens' document.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.model.kernels import gated_delta as gd
from lm.model.layers import Linear, RMSNorm, param

NAME = 'layers.linear_attn'
FAMILIES = ('qwen3_next', 'qwen3_5')


def sizes(cfg):
  """(D, G, H, K, V, W) from the model config."""
  la = cfg.linear_attn
  return (cfg.d_model, la.n_key_heads, la.n_value_heads, la.key_head_dim, la.value_head_dim,
          la.conv_kernel)


def causal_conv(x_BTHK, w_WHK, segment_ids_BT=None, history_BSHK=None):
  """Depthwise causal conv over T: y[t] = sum_i w[i] x[t - (W - 1) + i], taking only inputs of
  t's own document; `history` (the W - 1 inputs before this call, from the cache) counts as t's
  document. Returns (y in float32, the last W - 1 inputs for the next call)."""
  W = w_WHK.shape[0]
  B, T = x_BTHK.shape[:2]
  if history_BSHK is None:
    history_BSHK = jnp.zeros((B, W - 1, *x_BTHK.shape[2:]), x_BTHK.dtype)
  x_BSHK = jnp.concatenate([history_BSHK.astype(x_BTHK.dtype), x_BTHK], axis=1)
  x32, w32 = x_BSHK.astype(jnp.float32), w_WHK.astype(jnp.float32)
  y_BTHK = jnp.zeros(x_BTHK.shape, jnp.float32)
  for i in range(W):
    lag = W - 1 - i
    term = x32[:, i:i + T] * w32[i]
    if segment_ids_BT is not None and lag:
      before_BT = jnp.pad(segment_ids_BT, ((0, 0), (lag, 0)), constant_values=-1)[:, :T]
      same_BT = (before_BT == segment_ids_BT) | (before_BT == -1)  # -1: history or zeros
      term = jnp.where(same_BT[:, :, None, None], term, 0.0)
    y_BTHK = y_BTHK + term
  return y_BTHK, x_BSHK[:, -(W - 1):] if W > 1 else x_BSHK[:, :0]


class GatedDeltaNet(nnx.Module):
  """The mixer: __call__(x_BTD, ctx, cache=None) -> (y_BTD, new cache or None)."""

  def __init__(self, cfg, *, rngs):
    D, G, H, K, V, W = sizes(cfg)
    if H % G:
      raise ValueError(f'linear_attn.n_value_heads={H} is not a multiple of n_key_heads={G}')
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    self.q = lin((D,), (G, K), ('embed',), ('kv_heads', 'head_dim'), name=f'{NAME}.q')
    self.k = lin((D,), (G, K), ('embed',), ('kv_heads', 'head_dim'), name=f'{NAME}.k')
    self.v = lin((D,), (H, V), ('embed',), ('heads', 'head_dim'), name=f'{NAME}.v')
    self.z = lin((D,), (H, V), ('embed',), ('heads', 'head_dim'), name=f'{NAME}.z')
    self.b = lin((D,), (H,), ('embed',), ('heads',), name=f'{NAME}.b')
    self.a = lin((D,), (H,), ('embed',), ('heads',), name=f'{NAME}.a')
    self.o = lin((H, V), (D,), ('heads', 'head_dim'), ('embed',), name=f'{NAME}.o')
    dtype = jnp.dtype(cfg.param_dtype)
    # torch's Conv1d default (kaiming-uniform, a=sqrt(5)): U(+-1/sqrt(fan_in)), fan_in = W.
    conv_init = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -W ** -0.5, W ** -0.5)
    self.conv_q = param(rngs, conv_init, (W, G, K), (None, 'kv_heads', 'head_dim'), dtype)
    self.conv_k = param(rngs, conv_init, (W, G, K), (None, 'kv_heads', 'head_dim'), dtype)
    self.conv_v = param(rngs, conv_init, (W, H, V), (None, 'heads', 'head_dim'), dtype)
    # transformers' init: dt_bias 1, A = exp(A_log) uniform in [0.01, 16] (away from 0: log A finite).
    log_uniform = lambda key, shape, dt: jnp.log(jax.random.uniform(key, shape, dt, 0.01, 16.0))
    self.A_log = param(rngs, log_uniform, (H,), ('heads',), dtype)
    self.dt_bias = param(rngs, nnx.initializers.ones, (H,), ('heads',), dtype)
    self.norm = RMSNorm(V, cfg=cfg, rngs=rngs, axis='head_dim', offset=0.0)
    self.implementation = cfg.linear_attn.get('implementation', 'auto')
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)

  stack_name = 'linear_attn'

  @staticmethod
  def init_cache(cfg, batch_size, max_len=None, dtype=jnp.float32) -> dict:
    """The decoding state, whatever the sequence length (`max_len` is the attention caches')."""
    del max_len
    _, G, H, K, V, W = sizes(cfg)
    return {'conv': jnp.zeros((batch_size, 2 * G * K + H * V, W - 1), dtype),
            'state': jnp.zeros((batch_size, H, K, V), jnp.float32)}

  @staticmethod
  def cache_axes() -> dict:
    return {'conv': ('batch', None, None), 'state': ('batch', 'heads', 'head_dim', None)}

  def __call__(self, x_BTD, ctx, cache=None):
    seg_BT = ctx.segment_ids_BT
    if seg_BT is not None:
      x_BTD = jnp.where((seg_BT != 0)[:, :, None], x_BTD, jnp.zeros((), x_BTD.dtype))
    B, T = x_BTD.shape[:2]
    histories = (None,) * 3 if cache is None else self._split_conv(cache['conv'])
    convolved, new_histories = [], []
    for proj, w, history in zip((self.q, self.k, self.v), (self.conv_q, self.conv_k, self.conv_v),
                                histories):
      y, h = causal_conv(proj(x_BTD), w[...], seg_BT, history)
      convolved.append(jax.nn.silu(y))
      new_histories.append(h)
    q_BTGK, k_BTGK = (gd.l2norm(x).astype(self.compute_dtype) for x in convolved[:2])
    v_BTHV = convolved[2].astype(self.compute_dtype)
    beta_BTH = jax.nn.sigmoid(self.b(x_BTD).astype(jnp.float32))
    a_BTH = self.a(x_BTD).astype(jnp.float32) + self.dt_bias[...].astype(jnp.float32)
    g_BTH = -jnp.exp(self.A_log[...].astype(jnp.float32)) * jax.nn.softplus(a_BTH)
    args = (q_BTGK, k_BTGK, v_BTHV, g_BTH, beta_BTH)
    if cache is None:
      out_BTHV, _ = gd.gated_delta(*args, segment_ids_BT=seg_BT,
                                   implementation=self.implementation)
      new_cache = None
    else:
      if T == 1:  # one decoding step: no chunk padding
        out_BTHV, state = gd.recurrent_gated_delta_rule(*args, initial_state=cache['state'],
                                                        segment_ids_BT=seg_BT)
      else:
        out_BTHV, state = gd.gated_delta(*args, initial_state=cache['state'],
                                         segment_ids_BT=seg_BT, implementation=self.implementation)
      conv = jnp.concatenate([h.reshape(B, h.shape[1], -1) for h in new_histories], axis=-1)
      new_cache = {'conv': jnp.swapaxes(conv, 1, 2).astype(cache['conv'].dtype), 'state': state}
    gate_BTHV = jax.nn.silu(self.z(x_BTD).astype(jnp.float32))
    o_BTHV = (self.norm(out_BTHV.astype(self.compute_dtype)) * gate_BTHV).astype(self.compute_dtype)
    return self.o(o_BTHV), new_cache

  def _split_conv(self, conv_BCS):
    """The cache's conv inputs [B, channels, W - 1] as q, k, v histories [B, W - 1, heads, dim]."""
    shapes = [w.shape[1:] for w in (self.conv_q, self.conv_k, self.conv_v)]
    bounds = np.cumsum([math.prod(s) for s in shapes])[:-1]
    parts = jnp.split(jnp.swapaxes(conv_BCS, 1, 2), bounds, axis=-1)
    return tuple(p.reshape(*p.shape[:2], *s) for p, s in zip(parts, shapes))


def hf_tensors(family, cfg) -> dict:
  """How each HF tensor maps to this mixer's parameters, for a converter.

  {lm name (relative to the mixer) or a tuple of names: (HF tensor name relative to
  'model.layers.{i}.linear_attn.', HF -> lm, lm -> HF)}, numpy functions. A tuple key is one HF
  tensor holding several of our parameters: its HF -> lm function returns a tuple in the key's
  order, and its lm -> HF function takes them in that order. Both directions are exact
  (reshapes, transposes, slices)."""
  if family not in FAMILIES:
    raise ValueError(f'family {family!r}; choose one of {FAMILIES}')
  D, G, H, K, V, W = sizes(cfg)
  R = H // G
  same = (lambda x: x, lambda x: x)
  split_at = lambda widths: np.cumsum(widths)[:-1]

  def conv_to_lm(w):  # [channels, 1, W] -> ([W, G, K], [W, G, K], [W, H, V])
    q, k, v = np.split(w[:, 0, :].T, split_at([G * K, G * K, H * V]), axis=1)
    return q.reshape(W, G, K), k.reshape(W, G, K), v.reshape(W, H, V)

  def conv_to_hf(q, k, v):
    return np.concatenate([x.reshape(W, -1) for x in (q, k, v)], axis=1).T[:, None, :]

  def rows_to_lm(rows, *shape):  # HF Linear weight [out, D] -> our kernel [D, *out shape]
    return rows.T.reshape(D, *shape)

  def lm_to_rows(kernel):
    return kernel.reshape(D, -1).T

  table = {
      ('conv_q', 'conv_k', 'conv_v'): ('conv1d.weight', conv_to_lm, conv_to_hf),
      'o.kernel': ('out_proj.weight', lambda w: w.T.reshape(H, V, D),
                   lambda x: x.reshape(H * V, D).T),
      'A_log': ('A_log', *same),
      'dt_bias': ('dt_bias', *same),
      'norm.scale': ('norm.weight', *same),
  }
  if family == 'qwen3_5':
    def qkv_to_lm(w):
      q, k, v = np.split(w, split_at([G * K, G * K, H * V]), axis=0)
      return rows_to_lm(q, G, K), rows_to_lm(k, G, K), rows_to_lm(v, H, V)

    table.update({
        ('q.kernel', 'k.kernel', 'v.kernel'): (
            'in_proj_qkv.weight', qkv_to_lm,
            lambda q, k, v: np.concatenate([lm_to_rows(x) for x in (q, k, v)], axis=0)),
        'z.kernel': ('in_proj_z.weight', lambda w: rows_to_lm(w, H, V), lm_to_rows),
        'b.kernel': ('in_proj_b.weight', lambda w: rows_to_lm(w, H), lm_to_rows),
        'a.kernel': ('in_proj_a.weight', lambda w: rows_to_lm(w, H), lm_to_rows),
    })
    return table

  def qkvz_to_lm(w):  # rows [G, K | K | R·V | R·V]
    q, k, v, z = np.split(w.reshape(G, -1, D), split_at([K, K, R * V, R * V]), axis=1)
    to_kernel = lambda x, *shape: x.reshape(-1, D).T.reshape(D, *shape)
    return to_kernel(q, G, K), to_kernel(k, G, K), to_kernel(v, H, V), to_kernel(z, H, V)

  def qkvz_to_hf(q, k, v, z):
    groups = lambda x: x.reshape(D, G, -1).transpose(1, 2, 0)  # [G, rows per group, D]
    return np.concatenate([groups(x) for x in (q, k, v, z)], axis=1).reshape(-1, D)

  def ba_to_lm(w):  # rows [G, R | R]
    b, a = np.split(w.reshape(G, 2 * R, D), 2, axis=1)
    return b.reshape(H, D).T, a.reshape(H, D).T

  def ba_to_hf(b, a):
    groups = lambda x: x.T.reshape(G, R, D)
    return np.concatenate([groups(b), groups(a)], axis=1).reshape(2 * H, D)

  table.update({
      ('q.kernel', 'k.kernel', 'v.kernel', 'z.kernel'): ('in_proj_qkvz.weight', qkvz_to_lm,
                                                         qkvz_to_hf),
      ('b.kernel', 'a.kernel'): ('in_proj_ba.weight', ba_to_lm, ba_to_hf),
  })
  return table
