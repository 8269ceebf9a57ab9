"""Lazy safetensors reading and streamed writing, in numpy, without torch and without pickle.

The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then raw little-endian bytes. Reading memory-maps each file, so a tensor (or the
slice of it one device needs) is read from disk only when indexed; nothing loads a whole model.
bfloat16 is read and written through ml_dtypes (a JAX dependency).
"""

from __future__ import annotations

import glob
import json
import os
import struct

import ml_dtypes
import numpy as np

from lm.errors import CheckpointError

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def _header(path: str) -> tuple[dict, int]:
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f'{path} is not a safetensors file (shorter than its header)')
    (n,) = struct.unpack('<Q', raw)
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError, MemoryError, OverflowError):
      raise CheckpointError(f'{path} is not a safetensors file (unreadable header)') from None
  header.pop('__metadata__', None)
  return header, 8 + n


class Reader:
  """All tensors of one file, a list of files, or every *.safetensors file in a directory."""

  def __init__(self, paths):
    if isinstance(paths, str):
      paths = sorted(glob.glob(os.path.join(paths, '*.safetensors'))) if os.path.isdir(paths) else [paths]
    if not paths:
      raise CheckpointError('no *.safetensors files found')
    self.entries = {}  # name -> (path, dtype, shape, start)
    for path in paths:
      header, data_start = _header(path)
      size = os.path.getsize(path)
      for name, info in header.items():
        if not isinstance(info, dict) or info.get('dtype') not in DTYPES:
          raise CheckpointError(f'{path}: tensor {name!r} has an unsupported or missing dtype')
        begin, end = info['data_offsets']
        if data_start + end > size:  # memory-mapping it would fail later, far from the cause
          raise CheckpointError(f'{path} is truncated: tensor {name!r} ends at byte '
                                f'{data_start + end} but the file has {size}; download it again')
        self.entries[name] = (path, np.dtype(DTYPES[info['dtype']]), tuple(info['shape']),
                              data_start + begin)
    self._maps = {}

  def __contains__(self, name) -> bool:
    return name in self.entries

  def names(self) -> list[str]:
    return list(self.entries)

  def shape(self, name) -> tuple:
    return self.entries[name][2]

  def get(self, name) -> np.ndarray:
    """A read-only memory-mapped view: indexing it reads only the touched bytes."""
    path, dtype, shape, start = self.entries[name]
    if not shape or 0 in shape:
      count = int(np.prod(shape))
      with open(path, 'rb') as f:
        f.seek(start)
        return np.frombuffer(f.read(count * dtype.itemsize), dtype).reshape(shape)
    if path not in self._maps:
      self._maps[path] = np.memmap(path, dtype=np.uint8, mode='r')
    count = int(np.prod(shape))
    return self._maps[path][start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def write(path: str, tensors: dict, metadata: dict | None = None) -> None:
  """Writes {name: np.ndarray} as one safetensors file."""
  with Writer(path, {k: (v.dtype, v.shape) for k, v in tensors.items()}, metadata) as w:
    for name, value in tensors.items():
      w.add(name, value)


class Writer:
  """Streams tensors into a file whose header (names, dtypes, shapes) is declared up front, so
  only one tensor at a time is in memory. Tensors must be added in the declared order."""

  def __init__(self, path: str, layout: dict, metadata: dict | None = None):
    header, offset = {}, 0
    for name, (dtype, shape) in layout.items():
      dtype = np.dtype(dtype)
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
