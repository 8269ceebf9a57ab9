"""Hugging Face import/export: logits parity with transformers (CPU torch, fp32) per family."""

import json


import jax
import numpy as np
import pytest
from conftest import tiny_config

from lm.io import hf
from lm import sharding as sharding_lib
from lm.errors import CheckpointError, ConfigError
from lm.train.state import ModelSpec

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from hf_util import FAMILIES, TOKENS, hf_logits, make_hf_model  # pylint: disable=unused-import (tests reuse them)


def lm_model(path, mesh_shape=None):
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(path)))
  spec = ModelSpec(c.model)
  if mesh_shape:
    c.mesh.shape.update(mesh_shape)
  mesh = sharding_lib.make_mesh(c.mesh, None if mesh_shape else jax.devices()[:1])
  shardings = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, c.mesh.rules)
  return c, spec, hf.load_params(str(path), spec, shardings)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_import_matches_transformers_and_export_round_trips(family, tmp_path):
  reference = hf_logits(make_hf_model(family, tmp_path / 'hf', max_shard_size='40KB'))
  assert len(list((tmp_path / 'hf').glob('*.safetensors'))) > 1  # read shard by shard
  c, spec, params = lm_model(tmp_path / 'hf', dict(data=2, fsdp=2, tensor=2))
  assert len(params['layers.mlp.up.kernel'].sharding.device_set) == 8  # placed, not replicated
  ours = np.asarray(jax.jit(lambda p: spec.bind(p)(TOKENS))(params))
  assert np.max(np.abs(ours - reference)) <= 1e-4
  assert np.std(reference) > 0.5  # the comparison is not between near-constant logits

  hf.save(str(tmp_path / 'out'), params, c.model, max_shard_bytes=30_000)
  assert json.loads((tmp_path / 'out' / 'config.json').read_text())['model_type'] == (
      family[:-1] if family.startswith('llama') else family)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'out').float().eval()
  assert np.max(np.abs(hf_logits(reloaded) - reference)) <= 1e-5


def _rewrite(path, drop=None, reshape=None):
  from lm.io import safetensors as safetensors_io
  files = list(path.glob('*.safetensors'))
  assert len(files) == 1
  reader = safetensors_io.Reader(str(files[0]))
  tensors = {n: np.array(reader.get(n)) for n in reader.names() if n != drop}
  if reshape:
    tensors[reshape] = tensors[reshape][:-1]
  del reader
  safetensors_io.write(str(files[0]), tensors)


def test_clear_errors_name_the_tensor(tmp_path):
  make_hf_model('llama2', tmp_path)
  _, spec, _ = lm_model(tmp_path)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  _rewrite(tmp_path, drop='model.layers.1.mlp.up_proj.weight')
  with pytest.raises(CheckpointError, match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
    hf.load_params(str(tmp_path), spec, shardings)
  _rewrite(tmp_path, reshape='model.layers.0.self_attn.k_proj.weight')
  with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape "
                                            r"\(15, 32\), but the config implies \(16, 32\)"):
    hf.load_params(str(tmp_path), spec, shardings)
  config = json.loads((tmp_path / 'config.json').read_text())
  with pytest.raises(CheckpointError, match='unsupported architecture GPT2LMHeadModel'):
    hf.model_config_from_hf({**config, 'architectures': ['GPT2LMHeadModel'], 'model_type': 'gpt2'})
  with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported; lm implements "
                                       "default, llama3, linear, yarn"):
    hf.model_config_from_hf({**config, 'rope_parameters': {'rope_type': 'dynamic', 'factor': 2.0}})


def test_export_of_a_model_no_family_fits_is_refused():
  c = tiny_config(qkv_bias=True, sliding_window=4)
  with pytest.raises(CheckpointError, match='no supported HF architecture can express'):
    hf.family_of(c.model)



def test_mixed_window_and_full_layers_export_only_as_gemma():
  # Mistral's config has one window for every layer: mixed layers would lose their full ones.
  c = tiny_config(n_layers=2, sliding_window=4, layer_types=('sliding', 'full'), hf_family='mistral')
  with pytest.raises(CheckpointError, match=r"model.hf_family='mistral' cannot express model.layer_types"):
    hf.family_of(c.model)
  c.model.update(hf_family='', norm_offset=1.0, embed_scale=True, mlp_activation='gelu_tanh',
                 norm_placement='sandwich', attn_logit_softcap=50.0, final_logit_softcap=30.0)
  assert hf.family_of(c.model) == 'gemma2'
