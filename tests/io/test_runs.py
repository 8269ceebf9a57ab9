"""lm/io/runs.py, the one run-directory reader: the same fallback, rebuild and errors for every
reader (resume, lm generate, lm eval, lm export, train.init_from)."""

import os

import jax
import numpy as np
import pytest
from conftest import tiny_config

import lm_runs
from lm.errors import CheckpointError, UserError, read_json
from lm.io import runs
from lm.train import loop as train_lib

# Orbax abandons its other reads once one of a damaged checkpoint fails; they surface later.
pytestmark = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


def _tree(path) -> dict:
  return {os.path.relpath(os.path.join(r, n), path): os.path.getsize(os.path.join(r, n))
          for r, _, files in os.walk(path) for n in files}


def _run(tmp_path, trainable='all', steps=(1, 2)):
  """A run directory: config.json and checkpoints `steps` of the initial state (step s adds s)."""
  c = tiny_config()
  c.train.trainable = trainable
  trainer = train_lib.Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  ckpt = train_lib.make_checkpointer(c, str(tmp_path), trainer.labels)
  for s in steps:
    ckpt.save(s, state.replace(params={k: v + s for k, v in state.params.items()}), {'position': s})
  ckpt.close()
  (tmp_path / 'config.json').write_text(c.to_json_best_effort())
  return c, trainer, state


def test_every_reader_falls_back_from_an_unreadable_newest_checkpoint(tmp_path, capfd):
  c, trainer, state = _run(tmp_path)
  lm_runs.damage_checkpoint(tmp_path / 'checkpoints' / '2')
  before = _tree(tmp_path)
  capfd.readouterr()
  params, step = runs.restore_params(str(tmp_path), c, trainer.spec, trainer.shardings.params)
  assert step == 1
  np.testing.assert_array_equal(np.asarray(params['embed']), np.asarray(state.params['embed']) + 1)
  base = runs.base_params(str(tmp_path), trainer.spec, trainer.shardings.params)  # export, init_from
  np.testing.assert_array_equal(np.asarray(base['embed']), np.asarray(state.params['embed']) + 1)
  err = capfd.readouterr().err
  warnings = [l for l in err.splitlines() if l.startswith('lm: ')]
  assert len(warnings) == 2 and all('checkpoint step 2' in w and 'reading the previous' in w
                                    for w in warnings), err
  assert 'absl' not in err and '_CHECKPOINT_METADATA' not in err  # no spurious Orbax warnings
  assert _tree(tmp_path) == before  # a reader never moves or deletes another run's files
  with pytest.raises(CheckpointError, match='checkpoint step 2 .* is unreadable'):
    runs.restore_params(str(tmp_path), c, trainer.spec, trainer.shardings.params, step=2)


def test_a_partial_run_from_scratch_is_rebuilt_from_its_seed_by_every_reader(tmp_path):
  c, trainer, state = _run(tmp_path, trainable='regex:attn', steps=(1,))
  frozen = [n for n, label in trainer.labels.items() if label != 'trainable']
  trained = [n for n, label in trainer.labels.items() if label == 'trainable']
  assert frozen and trained
  params, _ = runs.restore_params(str(tmp_path), c, trainer.spec, trainer.shardings.params)
  base = runs.base_params(str(tmp_path), trainer.spec, trainer.shardings.params)
  for name in frozen:  # not saved: rebuilt from train.seed, as the run built them
    np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(state.params[name]))
    np.testing.assert_array_equal(np.asarray(base[name]), np.asarray(state.params[name]))
  for name in trained:
    np.testing.assert_array_equal(np.asarray(params[name]), np.asarray(state.params[name]) + 1)


def test_broken_run_files_are_one_line_errors(tmp_path):
  (tmp_path / 'checkpoints').mkdir()
  with pytest.raises(UserError, match='is not a run directory \\(no config.json\\)'):
    runs.load_config(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"model": {"d_model": ')
  with pytest.raises(CheckpointError, match='config.json is not valid JSON \\(line 1'):
    runs.load_config(str(tmp_path))
  (tmp_path / 'config.json').write_text('[1, 2]')
  with pytest.raises(CheckpointError, match='holds a JSON list, not an object'):
    runs.run_config(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"train": {}}')
  with pytest.raises(CheckpointError, match='has no model section'):
    runs.run_config(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"model": {}, "data": {"tokenizer": "/nonexistent/sp.model"}}')
  with pytest.raises(UserError, match='the tokenizer its config names \\(/nonexistent/sp.model\\) does not exist'):
    runs.run_tokenizer(str(tmp_path))
  with pytest.raises(CheckpointError, match='holds no checkpoint'):
    runs.read_params(str(tmp_path), plan=lambda saved: {})
  with pytest.raises(UserError, match='not found'):
    read_json(str(tmp_path / 'nope.json'), 'settings')
