"""The building blocks every part is made of: Linear (with its LoRA adapter) and RMSNorm.

Every parameter carries logical axis names (`out_sharding`); lm/sharding.py maps them to the mesh.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model import precision
from lm.model import quant
from lm.model.contract import contract, lora_contract

ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
               'relu2': lambda x: jnp.square(jax.nn.relu(x))}


def param(rngs, init, shape, axes, dtype):
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


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
    self.kernel = param(rngs, init, (*in_shape, *out_shape), (*in_axes, *out_axes), dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, tuple(out_shape), tuple(out_axes),
                        dtype) if use_bias else None)
    lora = cfg.lora
    self.lora_rank = lora.rank if lora.rank and re.search(lora.targets, name) else 0
    if self.lora_rank:
      r = self.lora_rank
      # A as PEFT initialises it (kaiming-uniform, a=sqrt(5): U(+-1/sqrt(fan_in))); B zero.
      bound = math.prod(in_shape) ** -0.5
      uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
      self.lora_a = param(rngs, uniform, (*in_shape, r), (*in_axes, None), dtype)
      self.lora_b = param(rngs, nnx.initializers.zeros, (r, *out_shape), (None, *out_axes), dtype)
      self.lora_scale = lora.alpha / (math.sqrt(r) if lora.rslora else r)
      self.lora_dropout = lora.dropout
    # Per call, set by configure_adapters: adapters on/off, and the key for adapter dropout.
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

  def weight(self):
    """W [*in, *out] in the compute dtype, with the adapter's A · B · scale added when it is on:
    for callers that contract W in another order than x · W (MLA's absorbed decoding)."""
    w = precision.to_compute_dtype(quant.as_array(self.kernel.get_value()), self.compute_dtype)
    if self.lora_rank and self.adapters:
      a, b = self._adapter()
      w = w + contract(a, b, 1)
    return w

  def _adapter(self):
    """(A, B · scale) in the compute dtype: the scale goes on B [r, *out], not on a [B, T, *out]
    product."""
    return (self.lora_a[...].astype(self.compute_dtype),
            (self.lora_b[...] * self.lora_scale).astype(self.compute_dtype))


class RMSNorm(nnx.Module):
  """x / rms(x) · (offset + scale) over the last len(shape) dims: offset 0 (Llama, scale starts
  at 1) or 1 (Gemma, Qwen3-Next: scale starts at 0). `offset` None: the model's `norm_offset`.
  `shape` may span several dims (OLMo's q/k norms cover all heads at once: (H, K))."""

  def __init__(self, shape, *, cfg, rngs, axis='embed', offset=None, eps=None):
    del rngs
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    axes = (axis,) if isinstance(axis, str) or axis is None else tuple(axis)
    self.eps = cfg.norm_eps if eps is None else eps
    self.offset = cfg.norm_offset if offset is None else offset
    self.n_dims = len(shape)
    init = jnp.zeros if self.offset else jnp.ones
    self.scale = nnx.Param(init(shape, jnp.dtype(cfg.param_dtype)), out_sharding=axes,
                           eager_sharding=False)

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    dims = tuple(range(-self.n_dims, 0))
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=dims, keepdims=True) + self.eps)
    return (normed * (self.offset + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def weightless_rms_norm(x, eps):
  """RMS normalisation without a learned scale (Gemma 4's value norm and its router's input),
  computed in float32 and returned in x's dtype."""
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def configure_adapters(module, adapters: bool, key) -> None:
  """Sets the per-call adapter switch and dropout key on every adapted linear layer in `module`
  (Linear, lm.model.moe.ExpertLinear: anything with a `lora_rank`)."""
  linears = [m for _, m in nnx.iter_modules(module) if getattr(m, 'lora_rank', 0)]
  keys = [None] * len(linears) if key is None else list(jax.random.split(key, max(len(linears), 1)))
  for linear, k in zip(linears, keys):
    linear.adapters, linear.dropout_key = adapters, nnx.data(k)
