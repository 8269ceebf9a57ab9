"""safetensors files: lazy reading with the `safetensors` package, streamed writing.

Reading goes through `safetensors.safe_open(..., framework='np')`: each file is memory-mapped by
the package and `get_slice` reads only the rows and columns asked for, so placing a model on a
mesh reads, per device, only that device's part of each tensor (bfloat16 arrives as ml_dtypes).

Writing is hand-written on purpose: `safetensors.numpy.save_file` takes every tensor of a file as
one in-memory dict, while exporting a model gathers one parameter at a time from the mesh
(lm/io/hf.py `write_sharded`). `Writer` declares the header up front and streams tensors in, so a
shard larger than host memory can be written; tests/io/test_safetensors.py reads its output back
with the package.
"""

from __future__ import annotations

import glob
import json
import math
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from lm.errors import CheckpointError

CODES = {np.dtype(np.float64): 'F64', np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16',
         np.dtype(ml_dtypes.bfloat16): 'BF16', np.dtype(np.int64): 'I64',
         np.dtype(np.int32): 'I32', np.dtype(np.int16): 'I16', np.dtype(np.int8): 'I8',
         np.dtype(np.uint8): 'U8', np.dtype(np.bool_): 'BOOL'}


class Reader:
  """All tensors of one file, a list of files, or every *.safetensors file in a directory."""

  def __init__(self, paths):
    if isinstance(paths, str):
      paths = sorted(glob.glob(os.path.join(paths, '*.safetensors'))) if os.path.isdir(paths) else [paths]
    if not paths:
      raise CheckpointError('no *.safetensors files found')
    self._files, self._where = {}, {}
    for path in paths:
      try:
        handle = safe_open(path, framework='np')
        names = handle.keys()
      except (SafetensorError, OSError) as e:
        raise CheckpointError(_truncation(path) or f'{path} is not a readable safetensors file '
                              f'({e}); re-download or re-export it') from None
      self._files[path] = handle
      self._where.update({name: path for name in names})

  def __contains__(self, name) -> bool:
    return name in self._where

  def names(self) -> list[str]:
    return list(self._where)

  def _slice(self, name):
    return self._files[self._where[name]].get_slice(name)

  def shape(self, name) -> tuple:
    return tuple(self._slice(name).get_shape())

  def _read(self, name, index=()):
    try:
      return np.asarray(self._slice(name)[index] if index else self._files[self._where[name]].get_tensor(name))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
      raise CheckpointError(f'{self._where[name]}: tensor {name!r} cannot be read ({e}); the file '
                            'is damaged or truncated') from None

  def get(self, name) -> np.ndarray:
    """The whole tensor."""
    return self._read(name)

  def read(self, name: str, shape: tuple, layout: int, index: tuple) -> np.ndarray:
    """`index` (a tuple of slices) of the tensor seen in lm's layout `shape` (lm/io/hf.py
    `to_lm`: HF [prod(outs), prod(ins)] as lm [*ins, *outs] for layout = len(ins) > 0, a reshape
    otherwise). Only the rows and columns the index touches are read from disk."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    if layout <= 0:
      if self.shape(name) == tuple(shape):
        return self._read(name, index)
      return self._read(name).reshape(shape)[index]
    ins, outs = shape[:layout], shape[layout:]
    c0, c1, in_rest, in_sub = _flat_range(ins, index[:layout])
    r0, r1, out_rest, out_sub = _flat_range(outs, index[layout:])
    block = self._read(name, (slice(r0, r1), slice(c0, c1))).reshape(*out_sub, *in_sub)
    view = block.transpose(*range(len(outs), len(shape)), *range(len(outs)))
    return view[in_rest + out_rest]


def _truncation(path: str) -> str | None:
  """Which tensor a truncated file cuts off, when that is what is wrong with it (a diagnosis
  only: reading is the package's)."""
  try:
    with open(path, 'rb') as f:
      (n,) = struct.unpack('<Q', f.read(8))
      header = json.loads(f.read(n))
    size = os.path.getsize(path)
    ends = {name: 8 + n + info['data_offsets'][1] for name, info in header.items()
            if isinstance(info, dict) and 'data_offsets' in info}
  except (OSError, ValueError, struct.error, TypeError, KeyError, IndexError, MemoryError, OverflowError):
    return None
  cut = sorted((end, name) for name, end in ends.items() if end > size)
  if not cut:
    return None
  end, name = cut[0]
  return (f'{path} is truncated: tensor {name!r} ends at byte {end} but the file has {size}; '
          'download it again')


def _flat_range(dims, index):
  """(start, stop, index left to apply, block shape) of the row-major flattening of `dims`
  restricted by `index`: one contiguous range when the index is, else all of it."""
  bounds = [s.indices(n) for s, n in zip(index, dims)]
  full = [b == (0, n, 1) for b, n in zip(bounds, dims)]
  if all(full):
    return 0, math.prod(dims), tuple(index), tuple(dims)
  k = full.index(False)
  start, stop, step = bounds[k]
  contiguous = step == 1 and math.prod(dims[:k]) == 1 and all(full[k + 1:])
  if not contiguous:
    return 0, math.prod(dims), tuple(index), tuple(dims)
  inner = math.prod(dims[k + 1:])
  sub = tuple(dims[:k]) + (stop - start,) + tuple(dims[k + 1:])
  return start * inner, stop * inner, (slice(None),) * len(dims), sub


def write(path: str, tensors: dict, metadata: dict | None = None) -> None:
  """Writes {name: np.ndarray} as one safetensors file."""
  with Writer(path, {k: (v.dtype, v.shape) for k, v in tensors.items()}, metadata) as w:
    for name, value in tensors.items():
      w.add(name, value)


class Writer:
  """Streams tensors into a file whose header (names, dtypes, shapes) is declared up front, so
  only one tensor at a time is in memory. Tensors must be added in the declared order. The file
  appears under its name only when complete (written as `<path>.tmp`, then renamed)."""

  def __init__(self, path: str, layout: dict, metadata: dict | None = None):
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
      dtype = np.dtype(dtype)
      if dtype not in CODES:
        raise CheckpointError(f'tensor {name!r}: dtype {dtype} cannot be written to safetensors')
      size = int(np.prod(shape)) * dtype.itemsize
      header[name] = {'dtype': CODES[dtype], 'shape': [int(s) for s in shape],
                      'data_offsets': [offset, offset + size]}
      offset += size
    if metadata:
      header['__metadata__'] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(',', ':')).encode()
    blob += b' ' * (-len(blob) % 8)  # data starts 8-byte aligned
    self.order = list(layout)
    self.layout = layout
    self.tmp = path + '.tmp'
    self.path = path
    self.f = open(self.tmp, 'wb')
    self.f.write(struct.pack('<Q', len(blob)) + blob)

  def add(self, name: str, value: np.ndarray) -> None:
    expected = self.order.pop(0)
    dtype, shape = self.layout[expected]
    if name != expected or tuple(value.shape) != tuple(shape) or value.dtype != np.dtype(dtype):
      raise ValueError(f'expected {expected} {tuple(shape)} {dtype}, got {name} {value.shape} '
                       f'{value.dtype}')
    self.f.write(np.ascontiguousarray(value).tobytes())  # little-endian hosts (x86, Arm)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *unused):
    self.f.close()
    if exc_type is None:
      if self.order:
        raise ValueError(f'tensors declared but not written: {self.order[:3]}...')
      os.replace(self.tmp, self.path)
    else:
      os.remove(self.tmp)
