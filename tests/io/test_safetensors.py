"""safetensors: lazy sliced reads through the `safetensors` package, the streaming writer read back
by the package, and damaged files as one-line errors."""

import itertools

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from lm.errors import CheckpointError
from lm.io import hf
from lm.io.safetensors import Reader, Writer, write


def _slices(n):
  return [slice(None), slice(0, max(1, n // 2)), slice(n // 2, n)]


@pytest.mark.parametrize('dtype', [np.float32, ml_dtypes.bfloat16])
def test_sliced_reads_equal_the_whole_tensor_viewed_in_lm_layout(tmp_path, dtype):
  rng = np.random.default_rng(0)
  cases = {  # lm shape, layout: [*ins, *outs] from HF [prod(outs), prod(ins)]
      'q': ((8, 4, 2), 1),        # embed -> heads, head_dim
      'o': ((4, 2, 8), 2),        # heads, head_dim -> embed
      'norm': ((8,), 0),
      'bias': ((4, 2), hf.FLAT),  # stored flat
  }
  tensors = {}
  for name, (shape, layout) in cases.items():
    tensors[name] = rng.normal(size=hf.hf_shape(shape, layout)).astype(dtype)
  save_file(tensors, str(tmp_path / 'model.safetensors'))
  reader = Reader(str(tmp_path))
  assert sorted(reader.names()) == sorted(cases)
  for name, (shape, layout) in cases.items():
    whole = hf.to_lm(tensors[name], shape, layout)
    for index in itertools.product(*[_slices(n) for n in shape]):
      got = reader.read(name, shape, layout, index)
      assert got.dtype == np.dtype(dtype)
      np.testing.assert_array_equal(got, whole[index])


def test_writer_streams_a_file_the_package_reads(tmp_path):
  path = str(tmp_path / 'out.safetensors')
  tensors = {'a': np.arange(12, dtype=np.float32).reshape(3, 4),
             'b': np.ones((2,), ml_dtypes.bfloat16), 'c': np.array([1, 2], np.int64)}
  with Writer(path, {k: (v.dtype, v.shape) for k, v in tensors.items()}, {'format': 'pt'}) as w:
    for name, value in tensors.items():  # one tensor at a time
      w.add(name, value)
  with safe_open(path, framework='np') as f:
    assert f.metadata() == {'format': 'pt'}
    for name, value in tensors.items():
      np.testing.assert_array_equal(f.get_tensor(name), value)


def test_a_failed_write_leaves_no_file(tmp_path):
  path = tmp_path / 'out.safetensors'
  with pytest.raises(ValueError):
    with Writer(str(path), {'a': (np.float32, (2,)), 'b': (np.float32, (2,))}) as w:
      w.add('a', np.zeros(2, np.float32))
      w.add('b', np.zeros(3, np.float32))  # not the declared shape
  assert not path.exists() and not (tmp_path / 'out.safetensors.tmp').exists()


def test_truncated_or_foreign_files_are_one_line_errors(tmp_path):
  path = tmp_path / 'model.safetensors'
  write(str(path), {'w': np.zeros((64, 64), np.float32)})
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match='model.safetensors'):
    Reader(str(path)).get('w')
  path.write_bytes(b'not a safetensors file')
  with pytest.raises(CheckpointError, match='not a readable safetensors file'):
    Reader(str(path))
  with pytest.raises(CheckpointError, match='no \\*.safetensors'):
    (tmp_path / 'empty').mkdir()
    Reader(str(tmp_path / 'empty'))
