import os
import re
import subprocess
import sys
import time

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


@pytest.mark.parametrize('preset, published', [
    ('70b', 70_553_706_496),  # Llama-3.1-70B
    ('qwen3-32b', 32_762_123_264),  # Qwen3-32B: 32.8B, 31.2B without the two embeddings
])
def test_large_presets_have_the_published_parameter_counts(preset, published):
  from lm.model.spec import ModelSpec  # pylint: disable=import-outside-toplevel
  assert ModelSpec(config_lib.model_config(preset)).param_count() == published


def test_config_reference_doc_is_in_sync():
  with open(os.path.join(ROOT, 'docs', 'config_reference.md'), encoding='utf-8') as f:
    on_disk = f.read().strip()
  assert on_disk == config_lib.reference_markdown().strip(), (
      'docs/config_reference.md is stale: run `python -m lm.config > docs/config_reference.md`')


# --- The schema ------------------------------------------------------------------------------------

# Keys whose every value of the right type is allowed (names, paths, patterns, flags); a key added
# to base_config() must get a SCHEMA entry or be listed here, so the schema stays complete.
FREE = {
    'data.chat_template', 'data.eval_files', 'data.fields', 'data.mixture', 'data.text_field',
    'data.tfds_data_dir', 'data.tokenizer', 'data.train_files', 'distributed.coordinator_address',
    'distributed.enabled', 'mesh.rules', 'metrics.tensorboard', 'model.embed_scale',
    'model.lora.rslora', 'model.lora.targets', 'model.norm_offset', 'model.qkv_bias',
    'model.rope_scaling', 'model.scan_layers', 'model.tie_embeddings', 'optimizer.no_decay',
    'train.async_checkpoint', 'train.early_stopping_metric', 'train.eval_tasks', 'train.init_from',
    'train.resume_changes', 'train.trainable', 'distill.teacher', 'grpo.prompts',
    'grpo.prompt_format', 'grpo.chat_template', 'grpo.rewards', 'grpo.reward_weights', 'grpo.stop', 'grpo.scale_rewards',
    'grpo.overlap', 'grpo.environment',
    'model.layer_types', 'model.mlp_bias', 'model.qk_norm', 'model.attn_out_bias',
    'model.hf_family', 'model.moe.norm_topk_prob', 'model.mlp_types', 'model.rope_layers',
    'model.attn_output_gate', 'model.attn_sinks', 'model.rope_interleaved', 'model.qk_l2_norm',
    'model.moe.router_bias', 'model.moe.shared_gate', 'model.moe.expert_bias',
    'model.moe.branch_norms',  # Gemma 4's MoE block
    'model.attn_k_eq_v', 'model.v_norm', 'model.layer_scale',  # Gemma 4's switches
    'train.trackers', 'train.tracker_project',  # names checked by lm/train/trackers.py before training
}


def test_every_key_has_a_schema_entry_or_is_free():
  keys = {k for k, _ in config_lib._flat_items(config_lib.base_config())}  # pylint: disable=protected-access
  unchecked = {k for k in keys if config_lib._schema_spec(k) is None}  # pylint: disable=protected-access
  assert unchecked == FREE
  assert not set(config_lib.SCHEMA) - keys - {'mesh.shape.*'}  # no entry for a key that is gone
  print(f'schema: {len(keys)} keys, {len(keys) - len(FREE)} with a range or choices, '
        f'{len(config_lib.RULES)} cross-field rules checked at load, '
        f'{len(config_lib.LATER_RULES)} checked where the devices or data are known')


def test_schema_choices_match_the_modules_that_use_them():
  from lm.data import chat, formats, pipeline  # pylint: disable=import-outside-toplevel
  from lm.model import attention  # pylint: disable=import-outside-toplevel
  from lm.train import objectives  # pylint: disable=import-outside-toplevel
  options = lambda key: set(config_lib.SCHEMA[key].options)  # pylint: disable=unnecessary-lambda-assignment
  assert options('model.attention') == set(attention.IMPLEMENTATIONS)
  assert options('train.objective') == set(objectives.OBJECTIVES)
  assert options('data.format') == set(formats.FORMATS)
  assert options('data.truncate') == set(formats.TRUNCATE)
  assert options('data.train_on') == set(chat.TRAIN_ON)
  assert options('data.packing') == set(pipeline.PACKINGS)
  assert options('data.streaming') == set(pipeline.STREAMING)


@pytest.mark.parametrize('override, message', [
    ({'optimizer.lr': -1e-3}, 'optimizer.lr=-0.001 must be positive'),
    ({'optimizer.lr': float('inf')}, 'optimizer.lr=inf is not a finite number'),
    ({'model.sliding_window': -1}, 'model.sliding_window=-1 must not be negative'),
    ({'model.n_kv_heads': 0}, 'model.n_kv_heads=0 must be at least 1'),
    ({'dpo.label_smoothing': 0.5}, 'dpo.label_smoothing=0.5 must be in [0, 0.5)'),
    ({'model.rope_scaling': {'factor': 8.0}}, 'model.rope_scaling='),
    ({'distributed.num_processes': 2, 'distributed.process_id': 2}, 'process id 2 is outside 0..1'),
])
def test_load_config_rejects_values_outside_the_schema(override, message):
  with pytest.raises(ConfigError, match=re.escape(message)):
    config_lib.load_config(QUICKSTART, override)


def test_load_config_takes_overrides_in_every_form_and_validates_once(monkeypatch):
  calls = []
  validate = config_lib.validate
  monkeypatch.setattr(config_lib, 'validate', lambda cfg: calls.append(1) or validate(cfg))
  for overrides in ({'optimizer.lr': 1e-4, 'train.steps': 7}, [('optimizer.lr', '1e-4'), ('train.steps', '7')],
                    ['--config.optimizer.lr=1e-4', '--config.train.steps', '7']):
    cfg = config_lib.load_config(QUICKSTART, overrides)
    assert cfg.optimizer.lr == 1e-4 and cfg.train.steps == 7
  assert len(calls) == 3
  config_lib.ensure_valid(cfg)  # what the Trainer calls: no second validation of the same config
  assert len(calls) == 3
  cfg.train.steps = 8  # changed since: checked again
  config_lib.ensure_valid(cfg)
  assert len(calls) == 4


def test_a_rejected_config_fails_before_jax_is_imported(tmp_path):
  """So before any compile, data preparation or write; the time is the whole process's."""
  code = ('import sys, time; t = time.perf_counter(); from lm import cli\n'
          'rc = cli.main(["train", "--config", "configs/quickstart.py", "--workdir", sys.argv[1], '
          '"--config.model.sliding_window=-1"])\n'
          'print(rc, "jax" in sys.modules, f"{time.perf_counter() - t:.3f}")')
  start = time.perf_counter()
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'run')], cwd=ROOT,
                       capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'PYTHONPATH': ROOT})
  wall = time.perf_counter() - start
  rc, jax_imported, seconds = out.stdout.split()
  print(f'rejected config: {seconds} s in main, {wall:.2f} s for the whole process')
  assert (rc, jax_imported) == ('2', 'False'), out.stderr
  assert out.stderr.strip() == 'lm: error: model.sliding_window=-1 must not be negative'
  assert not (tmp_path / 'run').exists()


def test_config_files_that_exit_or_build_their_own_partial_config(tmp_path):
  exits = tmp_path / 'exits.py'
  exits.write_text('import sys\ndef get_config(arg=None):\n  sys.exit(0)\n')
  with pytest.raises(ConfigError, match=re.escape("called sys.exit(0) while loading")):
    config_lib.load_config(str(exits))
  partial = tmp_path / 'partial.py'
  partial.write_text('import ml_collections\ndef get_config(arg=None):\n'
                     "  return ml_collections.ConfigDict({'train': {'steps': 3}})\n")
  with pytest.raises(ConfigError, match='the config lacks data.bad_records and .* more keys; build it '
                                        'from lm.config.base_config'):
    config_lib.load_config(str(partial), {'train.steps': 4})
