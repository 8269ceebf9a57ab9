"""MXFP4 expert weights, as gpt-oss checkpoints publish them, dequantized on load.

A quantized tensor `W` is stored as two: `W_blocks` uint8 [..., rows, G, B], each byte two FP4
(E2M1) values, the low nibble first, and `W_scales` uint8 [..., rows, G], one power-of-two scale
per block of 2·B values, biased by 127. Value = FP4_VALUES[nibble] · 2^(scale - 127). That is the
OCP microscaling format with 32-value blocks, and what transformers' `convert_moe_packed_tensors`
computes; `dequantize` returns its layout too: [E, G·2B, rows] (the rows, the layer's outputs,
last), e.g. gpt-oss's gate_up_proj [E, D, 2F] from `gate_up_proj_blocks` [E, 2F, D/32, 16].

Every FP4 value times a power of two is exact in float32 (a scale far out of range gives 0 or
inf there as in torch), so float32 results are bit-identical to transformers' in float32.
"""

from __future__ import annotations

import numpy as np

from lm.errors import CheckpointError

FP4_VALUES = np.asarray([+0.0, +0.5, +1.0, +1.5, +2.0, +3.0, +4.0, +6.0,
                         -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
BLOCKS, SCALES = '_blocks', '_scales'


def check(name: str, blocks_shape, scales_shape) -> None:
  """One line when the scales of tensor `name` do not match its blocks."""
  if tuple(blocks_shape[:-1]) != tuple(scales_shape) or len(blocks_shape) < 3:
    raise CheckpointError(
        f'MXFP4 tensor {name!r}: blocks {tuple(blocks_shape)} and scales {tuple(scales_shape)} do '
        'not match (blocks [..., rows, groups, bytes] need scales [..., rows, groups])')


def dequantize(blocks, scales, dtype=np.float32, name: str = 'tensor') -> np.ndarray:
  """blocks uint8 [E, rows, G, B], scales uint8 [E, rows, G] -> [E, G·2B, rows] in `dtype`."""
  blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
  check(name, blocks.shape, scales.shape)
  *prefix, rows, G, B = blocks.shape
  values = np.empty((*prefix, rows, G, 2 * B), np.float32)
  values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
  values[..., 1::2] = FP4_VALUES[blocks >> 4]
  exponents = scales.astype(np.int32)[..., None] - 127
  out = np.ldexp(values, exponents).reshape(*prefix, rows, G * 2 * B)
  return np.swapaxes(out, -1, -2).astype(dtype)


class Dequantizing:
  """A safetensors Reader (lm/io/safetensors.py) in which each MXFP4 pair `W_blocks`/`W_scales`
  reads as the one float32 tensor `W` transformers loads ([E, in, out] for gpt-oss's experts),
  dequantized when read, one tensor (one layer) at a time. Other tensors pass through. Blocks
  without their scales, or scales that do not match, are one line when it is built."""

  def __init__(self, reader, source: str = ''):
    self.reader = reader
    names = set(reader.names())
    self.packed = {}  # W -> (W_blocks, W_scales)
    for name in sorted(names):
      if not name.endswith(BLOCKS):
        continue
      base = name[:-len(BLOCKS)]
      scales = base + SCALES
      if scales not in names:
        raise CheckpointError(f'{source}: MXFP4 tensor {name!r} has no {scales!r}')
      check(f'{source}: {base}' if source else base, reader.shape(name), reader.shape(scales))
      self.packed[base] = (name, scales)
    orphans = [n for n in names if n.endswith(SCALES) and n[:-len(SCALES)] not in self.packed]
    if orphans:
      raise CheckpointError(f'{source}: MXFP4 scales {orphans[0]!r} have no blocks')
    hidden = {n for pair in self.packed.values() for n in pair}
    self._names = [n for n in reader.names() if n not in hidden] + list(self.packed)

  def __contains__(self, name) -> bool:
    return name in self.packed or name in self.reader

  def names(self) -> list[str]:
    return list(self._names)

  def shape(self, name) -> tuple:
    if name not in self.packed:
      return self.reader.shape(name)
    *prefix, rows, G, B = self.reader.shape(self.packed[name][0])
    return (*prefix, G * 2 * B, rows)

  def get(self, name) -> np.ndarray:
    if name not in self.packed:
      return self.reader.get(name)
    blocks, scales = self.packed[name]
    return dequantize(self.reader.get(blocks), self.reader.get(scales), name=name)

  def read(self, name: str, shape: tuple, layout: int, index: tuple) -> np.ndarray:
    if name not in self.packed:
      return self.reader.read(name, shape, layout, index)
    if layout > 0:  # these tensors are already [E, in, out]; a plain reshape is their only layout
      raise CheckpointError(f'MXFP4 tensor {name!r} read with a transposing layout')
    return self.get(name).reshape(shape)[tuple(index)]


def wrap(reader, source: str = ''):
  """`reader` itself, or a Dequantizing view of it when it holds MXFP4 tensors."""
  if any(n.endswith((BLOCKS, SCALES)) for n in reader.names()):
    return Dequantizing(reader, source)
  return reader
