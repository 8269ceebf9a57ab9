import os

import pytest

from lm import config as config_lib
from lm.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')


def test_config_files_load_locked_with_defaults():
  for name in os.listdir(os.path.join(ROOT, 'configs')):
    if name.endswith('.py'):
      cfg = config_lib.load_config(os.path.join(ROOT, 'configs', name))
      assert cfg.is_locked
      if 'model' in cfg:  # training configs; configs/eval.py holds evaluation settings only
        config_lib.validate(cfg)


def test_override_parses_by_field_type():
  cfg = config_lib.load_config(QUICKSTART)
  for key, value in config_lib.parse_overrides(
      ['--config.optimizer.lr=1e-4', '--config.train.steps', '7', '--config.model.scan_layers=false',
       '--config.data.train_files=a.txt']):
    config_lib.apply_override(cfg, key, value)
  assert cfg.optimizer.lr == 1e-4 and cfg.train.steps == 7 and cfg.model.scan_layers is False
  assert cfg.data.train_files == 'a.txt'


def test_unknown_key_names_the_nearest_valid_key():
  cfg = config_lib.load_config(QUICKSTART)
  with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.lrr'; did you mean 'lr'\?"):
    config_lib.apply_override(cfg, 'optimizer.lrr', '1')
  with pytest.raises(ConfigError, match=r"did you mean 'optimizer'\?"):
    config_lib.apply_override(cfg, 'optimiser.lr', '1')


def test_wrong_type_is_rejected():
  cfg = config_lib.load_config(QUICKSTART)
  with pytest.raises(ConfigError, match=r"--config.train.steps='ten' is not a valid int"):
    config_lib.apply_override(cfg, 'train.steps', 'ten')


def test_locked_config_rejects_new_attributes():
  cfg = config_lib.load_config(QUICKSTART)
  with pytest.raises(AttributeError, match='Did you mean "steps"'):
    cfg.train.stepz = 3


@pytest.mark.parametrize('override, message', [
    (('model.n_kv_heads', '3'), 'must be a multiple of model.n_kv_heads'),
    (('data.seq_len', '4096'), 'exceeds model.max_seq_len'),
    (('train.microbatches', '3'), 'not divisible by train.microbatches'),
    (('model.remat', 'some'), 'choose none, full, dots'),
])
def test_inconsistent_values_fail_validation(override, message):
  cfg = config_lib.load_config(QUICKSTART)
  config_lib.apply_override(cfg, *override)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(cfg)


def test_missing_config_file_and_presets():
  with pytest.raises(ConfigError, match='not found'):
    config_lib.load_config('configs/nope.py')
  assert config_lib.model_config('8b').mlp_dim == 14336
  with pytest.raises(ConfigError, match='unknown model preset'):
    config_lib.model_config('3b')


def test_config_reference_doc_is_in_sync():
  with open(os.path.join(ROOT, 'docs', 'config_reference.md'), encoding='utf-8') as f:
    on_disk = f.read().strip()
  assert on_disk == config_lib.reference_markdown().strip(), (
      'docs/config_reference.md is stale: run `python -m lm.config > docs/config_reference.md`')
