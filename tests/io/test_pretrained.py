"""train.init_from: starting from a Hugging Face directory or an lm run, and exporting a run."""

import json

import jax
import numpy as np
import pytest
from conftest import random_batch, tiny_config
from lm_runs import save_lora_run

from lm.model import lora
from lm.io import pretrained
from lm.errors import ConfigError, UserError
from lm.train.loop import Trainer


def logits(trainer, params, tokens):
  return np.asarray(jax.jit(lambda p: trainer.spec.bind(p)(tokens))(params))


def test_lora_from_a_hf_directory_starts_as_the_hf_model(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  from hf_util import TOKENS, hf_logits, make_hf_model
  expected = hf_logits(make_hf_model('qwen2', tmp_path / 'hf'))
  c = tiny_config(d_model=48, n_layers=3)  # the model section is replaced by the HF config's
  c.train.update(init_from=str(tmp_path / 'hf'), trainable='lora')
  c.model.lora.update(rank=4, alpha=8.0)
  c.mesh.shape.update(data=1, fsdp=2)
  trainer = Trainer(c, devices=jax.devices()[:2])
  assert (c.model.d_model, c.model.n_layers, c.model.qkv_bias) == (32, 2, True)
  state = trainer.init_state()
  assert np.max(np.abs(logits(trainer, state.params, TOKENS) - expected)) <= 1e-4
  state, metrics = trainer.step(state, trainer.global_batch(random_batch(c)))
  assert np.isfinite(float(metrics['loss']))


def test_full_finetune_from_an_lm_lora_run_merges_it_and_exports(tmp_path):
  run = tmp_path / 'run'
  c = tiny_config()
  c.model.lora.update(rank=4, alpha=8.0, targets=r'attn\.(q|v)')
  c.train.trainable = 'lora'
  # As `lm train` saves a LoRA run: the adapters only; the base is rebuilt from the run's seed.
  source, params = save_lora_run(run, c)
  tokens = random_batch(c)['tokens']
  expected = logits(source, params, tokens)

  ft = tiny_config(d_model=64)
  ft.train.init_from = str(run)
  trainer = Trainer(ft, devices=jax.devices()[:1])
  assert ft.model.d_model == 32 and ft.model.lora.rank == 0
  started = trainer.init_state()
  assert int(started.step) == 0 and set(started.params) == set(lora.split(params)[0])
  np.testing.assert_allclose(logits(trainer, started.params, tokens), expected, atol=2e-5)

  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  print(pretrained.export_run(str(run), str(tmp_path / 'hf')))
  assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['architectures'] == [
      'LlamaForCausalLM']
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'hf').float().eval()
  with torch.no_grad():
    got = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  np.testing.assert_allclose(got, expected, atol=1e-4)


def test_init_from_a_directory_that_is_neither_is_a_clear_error(tmp_path):
  c = tiny_config()
  c.train.init_from = str(tmp_path)
  with pytest.raises(ConfigError, match='neither an lm run directory'):
    Trainer(c)


def test_load_model_takes_a_hf_directory_and_generates(tmp_path):
  """lm.load_model (and so lm generate / eval / compare) accepts a Hugging Face directory."""
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  import lm
  from lm.data import tokenizer as tokenizer_lib
  from hf_util import TOKENS, hf_logits, make_hf_model
  expected = hf_logits(make_hf_model('llama2', tmp_path / 'hf'))
  import pydoc_data.topics
  docs = [t.lower() for t in pydoc_data.topics.topics.values()]
  tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'hf' / 'tokenizer.model'), 128,
                                byte_fallback=False)
  model = lm.load_model(f'hf={tmp_path / "hf"}')
  assert model.name == 'hf' and model.cfg.model.vocab_size == 128
  got = np.asarray(jax.jit(lambda p: model.spec.bind(p)(TOKENS))(model.params))
  assert np.max(np.abs(got - expected)) <= 1e-4
  completions = lm.complete(model, ['the cat', 'a dog'], max_new_tokens=5)
  assert len(completions) == 2 and all(isinstance(c, str) for c in completions)
  with pytest.raises(lm.errors.UserError, match='one set of weights'):
    lm.load_model(f'{tmp_path / "hf"}@3')


# --- export never writes on, in or over what it reads --------------------------------------------

def _tree(path):
  import os
  return {os.path.relpath(os.path.join(r, n), path): os.path.getsize(os.path.join(r, n))
          for r, _, files in os.walk(path) for n in files}


@pytest.fixture(scope='module')
def small_run(tmp_path_factory):
  run = tmp_path_factory.mktemp('export') / 'run'
  c = tiny_config()
  c.model.lora.update(rank=2, alpha=4.0)
  c.train.trainable = 'lora'
  save_lora_run(run, c)
  return run


@pytest.mark.parametrize('where, needle', [
    ('{run}', 'is the input this command reads; write to a new path'),
    ('{run}/checkpoints', 'is inside {run}, which this command reads; write outside it'),
    ('{run}/..', 'holds {run}, which this command reads; writing there could destroy it'),
    ('{other}', 'is a folder of other files (not an earlier HF export of {run}); name a new or '
                'empty directory'),
])
def test_export_refuses_the_run_its_insides_its_parent_and_foreign_folders(small_run, tmp_path,
                                                                           where, needle):
  other = tmp_path / 'other_model'
  other.mkdir()
  (other / 'model.safetensors').write_bytes(b'another model')
  out = where.format(run=small_run, other=other)
  before, before_other = _tree(small_run), _tree(other)
  with pytest.raises(UserError) as e:
    pretrained.export_run(str(small_run), out)
  assert needle.format(run=small_run) in str(e.value), str(e.value)
  assert _tree(small_run) == before and _tree(other) == before_other


def test_export_replaces_its_own_earlier_export_whole_and_keeps_it_when_writing_fails(
    small_run, tmp_path, monkeypatch):
  import os
  from lm.io import hf
  out = tmp_path / 'hf'
  pretrained.export_run(str(small_run), str(out))
  (out / 'stale-00002-of-00002.safetensors').write_bytes(b'left from an older export')
  pretrained.export_run(str(small_run), str(out))  # the same run's export: replaced, not mixed
  assert not (out / 'stale-00002-of-00002.safetensors').exists()
  first = _tree(out)

  def failing_save(path, *args, **kwargs):
    (tmp_path / 'seen').write_text(path)
    with open(os.path.join(path, 'model.safetensors'), 'wb') as f:
      f.write(b'half')
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(hf, 'save', failing_save)
  with pytest.raises(OSError):
    pretrained.export_run(str(small_run), str(out))
  assert _tree(out) == first  # the earlier export, whole
  assert sorted(os.listdir(tmp_path)) == ['hf', 'seen']  # and no partial sibling left behind


def test_gguf_export_refuses_a_path_in_the_run_or_a_file_that_is_not_gguf(small_run, tmp_path):
  pytest.importorskip('gguf')
  notes = tmp_path / 'notes.txt'
  notes.write_text('mine')
  with pytest.raises(UserError, match='is inside the lm run directory|is inside .*which this command reads'):
    pretrained.export_run(str(small_run), str(small_run / 'model.gguf'), fmt='gguf')
  with pytest.raises(UserError, match='exists and is not an earlier GGUF export; name a new file'):
    pretrained.export_run(str(small_run), str(notes), fmt='gguf')
  assert notes.read_text() == 'mine'


def test_every_model_key_is_architecture_or_a_run_setting():
  """Starting from an lm run carries the keys that describe its weights (pretrained.ARCH_KEYS);
  a model key added to lm/config.py must be one or the other, or a run started from an lm run of
  that family would silently build another model."""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  run_settings = {'attention', 'compute_dtype', 'context_parallel', 'lora', 'loss_chunk_size',
                  'param_dtype', 'quant', 'remat', 'scan_layers'}
  keys = set(config_lib.model_config().keys())
  assert keys - set(pretrained.ARCH_KEYS) == run_settings
  assert set(pretrained.ARCH_KEYS) <= keys
  # The same within model.moe: the loss weights, balancing rate and kernel are the run's.
  moe_settings = {'aux_loss_weight', 'bias_update_rate', 'capacity_factor', 'implementation',
                  'z_loss_weight'}
  moe_keys = set(config_lib.model_config().moe.keys())
  assert moe_keys - set(pretrained.MOE_ARCH_KEYS) == moe_settings
  assert set(pretrained.MOE_ARCH_KEYS) <= moe_keys
