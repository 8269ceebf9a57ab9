"""Quantized frozen weights for QLoRA: int8 or NF4 with per-block scales, via qwix.

`quantize` turns a stacked Linear kernel [L, *in, *out] into a qwix QArray: values in int8 (or
4-bit NormalFloat, Dettmers et al. 2023) and one float scale per block of `block` consecutive
entries along the kernel's largest input axis (absmax calibration); every other axis, the layer
axis included, is channelwise. The train state holds the QArray's two arrays as ordinary
parameters, `<name>` (the quantized values) and `<name>_scale`, so sharding, labels and
checkpoints see plain arrays. `ModelSpec.bind` reassembles the QArray, and `Linear` dequantizes
its kernel when it runs: inside the layer scan, one layer at a time, never the whole stack.

Double quantization (quantizing the scales) is not done: with block 64 the float32 scales add
0.5 bits per weight.
"""

from __future__ import annotations

import jax.numpy as jnp
import qwix

QTYPES = {'int8': jnp.int8, 'nf4': 'nf4'}
SCALE_SUFFIX = '_scale'


def tiling(shape, n_in: int, block: int) -> tuple[tuple[int, ...], dict]:
  """(channelwise axes, {tiled axis: block}) for a stacked kernel [L, *in(n_in), *out]: blocks
  along the largest input axis (the whole axis when `block` does not divide it)."""
  inputs = range(1, 1 + n_in)
  axis = max(inputs, key=lambda a: shape[a])
  size = shape[axis]
  tile = block if size % block == 0 and size > block else size
  return tuple(a for a in range(len(shape)) if a != axis), {axis: tile}


def quantize(kernel, qtype: str, block: int, n_in: int):
  """-> (values, scales) of `kernel`; the scales have the kernel's rank, a block's axis shrunk."""
  channelwise, tiled = tiling(kernel.shape, n_in, block)
  q = qwix.quantize(kernel, QTYPES[qtype], channelwise_axes=channelwise, tiled_axes=tiled)
  return q.qvalue, q.scale


def scale_shape(shape, n_in: int, block: int) -> tuple[int, ...]:
  _, tiled = tiling(shape, n_in, block)
  (axis, tile), = tiled.items()
  return tuple(s // tile if a == axis else s for a, s in enumerate(shape))


def quantized_array(values, scales, qtype: str):
  """The qwix QArray the state's two arrays stand for."""
  return qwix.QArray(qvalue=values, scale=scales, zero_point=None, qtype=QTYPES[qtype])


def as_array(value):
  """A Linear's kernel as a float array: dequantized if the state holds it quantized."""
  if isinstance(value, qwix.QArray):
    return qwix.dequantize(value)
  return value


def storage_bytes(values, scales) -> int:
  """Bytes the quantized kernel needs packed: 4 or 8 bits per value plus the float scales (XLA
  on CPU keeps a uint4 array one byte per value; TPUs and GPUs pack it)."""
  bits = 4 if values.dtype == jnp.uint4 else 8 * values.dtype.itemsize
  return values.size * bits // 8 + scales.size * scales.dtype.itemsize


def without_quant(model_cfg):
  """The model config with its base weights in float (what checkpoints and HF files hold)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = ml_collections.ConfigDict(model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else model_cfg)
  if 'quant' in cfg:
    cfg.quant.type = 'none'
  return cfg


def qtype_of(model_cfg) -> str:
  quant = model_cfg.get('quant') if hasattr(model_cfg, 'get') else None
  return 'none' if quant is None else quant.type
