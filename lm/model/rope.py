"""Rotary position embeddings: the frequency tables transformers computes (default, llama3,
linear, YaRN scaling) and their application to queries and keys.

`partial_rotary_factor` < 1 (Qwen3.5, Qwen3-Next) rotates only the first `rotary_dim` dims of
each head and passes the rest through; a NoPE layer (SmolLM3, Llama 4) has an all-zero table,
which rotates by angle 0: the identity, so such layers still scan with the others.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from lm.config import ROPE_SCALING_TYPES, head_dim, mla_enabled
from lm.errors import ConfigError


def rotary_dim(cfg, K: int = 0) -> int:
  """Dims of each head that RoPE rotates (even): head_dim (or `K`, a layer's own head dim) ·
  partial_rotary_factor, or MLA's qk_rope_head_dim."""
  if mla_enabled(cfg):
    return cfg.mla.qk_rope_head_dim
  K = K or head_dim(cfg)
  return int(K * cfg.partial_rotary_factor) // 2 * 2


def rope(cfg, *, local: bool = False, K: int = 0) -> tuple[np.ndarray, float]:
  """(inverse frequencies [K/2] float32, attention factor) as transformers computes them.

  `rope_scaling['type']`: llama3 (the default, for configs that predate the key), linear
  (positions / factor), yarn (NTK-by-parts with its cos/sin factor) or proportional (Gemma 4's
  full layers: the first partial_rotary_factor of the frequencies, the rest 0, so the other dims
  pass through, all / factor). `local`: the table of 'sliding' layers, which is unscaled RoPE at
  `rope_local_theta` when that is set (Gemma 3). `K`: the layers' head dim (0: head_dim).
  """
  K = rotary_dim(cfg, K)
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
  if kind == 'proportional':  # as transformers' _compute_proportional_rope_parameters
    angles = int(scaling['partial_rotary_factor'] * K // 2)
    inv_freq = np.concatenate([inv_freq[:angles], np.zeros(K // 2 - angles, np.float32)])
    return (inv_freq / np.float32(factor)).astype(np.float32), 1.0
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
  """Inverse frequencies [rotary_dim/2] of the full-attention layers."""
  return jnp.asarray(rope(cfg)[0])


def apply_rope(x_BTHK, positions_BT, inv_freq, factor=1.0, *, interleaved=False):
  """Rotates the first 2 · len(inv_freq) dims of each head; the others pass through. The pairs
  rotated together are the two halves (the Hugging Face Llama layout) or, `interleaved`,
  neighbouring dims (2i, 2i + 1: Llama 4, DeepSeek, GLM), as each family's weights expect, so
  imported weights need no permutation. `factor` scales cos and sin (YaRN's attention factor)."""
  R = 2 * inv_freq.shape[-1]
  angles_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq
  cos = (jnp.cos(angles_BTk) * factor)[:, :, None]
  sin = (jnp.sin(angles_BTk) * factor)[:, :, None]
  x = x_BTHK.astype(jnp.float32)
  if interleaved:
    x1, x2 = x[..., 0:R:2], x[..., 1:R:2]
    rotated = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = jnp.concatenate([rotated.reshape(*x.shape[:-1], R), x[..., R:]], axis=-1)
  else:
    x1, x2 = jnp.split(x[..., :R], 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., R:]], axis=-1)
  return out.astype(x_BTHK.dtype)
