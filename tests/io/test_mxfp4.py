"""MXFP4 dequantization against transformers' own (convert_moe_packed_tensors), bit for bit."""

import numpy as np
import pytest

from lm.errors import CheckpointError
from lm.io import mxfp4

torch = pytest.importorskip('torch')
hf_mxfp4 = pytest.importorskip('transformers.integrations.mxfp4')


def test_dequantize_is_transformers_bit_for_bit():
  rng = np.random.default_rng(0)
  E, rows, G, B = 3, 8, 2, 16  # gate_up_proj_blocks of gpt-oss: [E, 2F, D/32, 16]
  blocks = rng.integers(0, 256, (E, rows, G, B), dtype=np.uint8)
  scales = rng.integers(127 - 8, 127 + 8, (E, rows, G), dtype=np.uint8)
  scales[0, 0, 0] = 255  # 2^128: inf in float32 where the value is not 0
  scales[0, 1, 0] = 0  # 2^-127: subnormal float32
  ours = mxfp4.dequantize(blocks, scales)
  theirs = hf_mxfp4.convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                               dtype=torch.float32).numpy()
  assert ours.shape == theirs.shape == (E, G * 2 * B, rows)
  assert ours.tobytes() == theirs.tobytes()
  # Each value is an FP4 value times its block's power of two.
  assert ours[1, 0, 0] == mxfp4.FP4_VALUES[blocks[1, 0, 0, 0] & 15] * 2.0 ** (int(scales[1, 0, 0]) - 127)


def test_scales_that_do_not_match_the_blocks_are_one_line():
  blocks = np.zeros((2, 4, 2, 16), np.uint8)
  with pytest.raises(CheckpointError, match=r"'mlp.experts.down_proj'.*do not match") as e:
    mxfp4.dequantize(blocks, np.zeros((2, 4, 3), np.uint8), name='mlp.experts.down_proj')
  assert '\n' not in str(e.value)


def test_a_checkpoint_reader_sees_dequantized_tensors_in_place_of_blocks_and_scales(tmp_path):
  from lm.io.safetensors import Reader, write
  rng = np.random.default_rng(1)
  blocks = rng.integers(0, 256, (2, 6, 1, 16), dtype=np.uint8)  # [E, 2F, D/32, 16]
  scales = rng.integers(120, 130, (2, 6, 1), dtype=np.uint8)
  name = 'model.layers.0.mlp.experts.gate_up_proj'
  bias = rng.standard_normal((2, 6)).astype(np.float32)
  write(str(tmp_path / 'model.safetensors'), {name + '_blocks': blocks, name + '_scales': scales,
                                              name + '_bias': bias})
  reader = mxfp4.wrap(Reader(str(tmp_path / 'model.safetensors')))
  assert sorted(reader.names()) == sorted([name, name + '_bias']) and name in reader
  assert reader.shape(name) == (2, 32, 6)  # gpt-oss's gate_up_proj [E, D, 2F]
  np.testing.assert_array_equal(reader.get(name), mxfp4.dequantize(blocks, scales))
  np.testing.assert_array_equal(reader.read(name, (2, 32, 6), 0, (slice(1, 2),)),
                                mxfp4.dequantize(blocks, scales)[1:2])
  np.testing.assert_array_equal(reader.get(name + '_bias'), bias)

  write(str(tmp_path / 'bad.safetensors'), {name + '_blocks': blocks,
                                            name + '_scales': scales[:, :5]})
  with pytest.raises(CheckpointError, match='do not match'):
    mxfp4.wrap(Reader(str(tmp_path / 'bad.safetensors')), 'ckpt')
  write(str(tmp_path / 'orphan.safetensors'), {name + '_scales': scales})
  with pytest.raises(CheckpointError, match='have no blocks'):
    mxfp4.wrap(Reader(str(tmp_path / 'orphan.safetensors')), 'ckpt')
