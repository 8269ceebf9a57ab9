"""The training loop end to end: resume, checkpoints, metrics, and the CLI's errors."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT, random_batch, tiny_config

from lm.train import loop as train_lib
from lm.train.checkpoint import Checkpointer
from lm.errors import CheckpointError
from lm.train.metrics import read_metrics


@pytest.fixture(scope='module')
def corpus_file(tmp_path_factory):
  import pydoc_data.topics
  path = tmp_path_factory.mktemp('data') / 'docs.jsonl'
  with open(path, 'w') as f:
    for key in sorted(pydoc_data.topics.topics)[:40]:
      f.write(json.dumps({'text': pydoc_data.topics.topics[key]}) + '\n')
  return str(path)


def run_config(corpus_file, steps):
  c = tiny_config(vocab_size=512, max_seq_len=64)
  c.data.update(train_files=corpus_file, tokenizer_vocab_size=512, seq_len=32, batch_size=8)
  c.train.update(steps=steps, log_every=1, eval_every=4, eval_batches=2, checkpoint_every=3)
  c.metrics.update(peak_flops_per_device=1e12)
  c.mesh.shape.update(data=-1)  # all 8 test devices
  return c


def test_checkpoint_restore_gives_identical_next_step(tmp_path):
  c = tiny_config()
  trainer = train_lib.Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  batches = [trainer.global_batch(random_batch(c, seed=i)) for i in range(3)]
  state, _ = trainer.step(state, batches[0])
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {'position': 1})
  ckpt.wait()
  _, expected = trainer.step(state, batches[1])
  restored, data_state = ckpt.restore(trainer.abstract_state, trainer.shardings)
  assert data_state == {'position': 1} and int(restored.step) == 1
  _, got = trainer.step(restored, batches[1])
  assert float(got['loss']) == float(expected['loss'])


def test_restore_onto_a_different_model_is_a_clear_error(tmp_path):
  c = tiny_config()
  trainer = train_lib.Trainer(c, devices=jax.devices()[:1])
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, trainer.init_state(), {'position': 0})
  ckpt.wait()
  bigger = train_lib.Trainer(tiny_config(d_model=64), devices=jax.devices()[:1])
  with pytest.raises(CheckpointError, match='does not fit this model'):
    ckpt.restore(bigger.abstract_state, bigger.shardings)


def test_train_writes_run_directory_and_resumes_exactly(tmp_path, corpus_file):
  straight = train_lib.train(run_config(corpus_file, 8), str(tmp_path / 'a'), progress=False)
  run_dir = tmp_path / 'b'
  train_lib.train(run_config(corpus_file, 5), str(run_dir), progress=False)
  # Same command with more steps: resumes from the step-5 checkpoint, data position included.
  resumed = train_lib.train(run_config(corpus_file, 8), str(run_dir), progress=False)
  a = {m['step']: m['loss'] for m in read_metrics(str(tmp_path / 'a')) if 'loss' in m}
  b = {m['step']: m['loss'] for m in read_metrics(str(run_dir)) if 'loss' in m}
  for step in (6, 7, 8):
    assert a[step] == pytest.approx(b[step], rel=1e-6), step
  assert resumed['eval_loss'] == pytest.approx(straight['eval_loss'], rel=1e-5)
  names = set(os.listdir(run_dir))
  assert {'checkpoints', 'config.json', 'metrics.jsonl', 'tensorboard', 'tokenizer.model',
          'summary.json'} <= names
  assert sorted(os.listdir(run_dir / 'checkpoints')) == ['3', '5', '8'] or '8' in os.listdir(
      run_dir / 'checkpoints')
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(run_dir / 'tensorboard'))
  rows = read_metrics(str(run_dir))
  logged = [m for m in rows if 'tokens_per_s' in m]
  assert logged and all(m['tokens_per_s'] > 0 and 0 < m['mfu'] < 1 for m in logged)
  assert any('eval_perplexity' in m for m in rows)
  assert np.isfinite(straight['eval_perplexity']) and straight['unigram_perplexity'] > 1
  # The same command on the finished run trains nothing and keeps what the training recorded.
  again = train_lib.train(run_config(corpus_file, 8), str(run_dir), progress=False)
  assert again['step'] == 8 and again['loss'] == resumed['loss']
  assert again['eval_loss'] == pytest.approx(resumed['eval_loss'], rel=1e-6)
  assert json.loads((run_dir / 'summary.json').read_text())['loss'] == resumed['loss']


def _cli(*args, cwd=ROOT):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'lm', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_train_runs_and_reports(tmp_path, corpus_file):
  out = _cli('train', '--config', 'configs/quickstart.py', '--workdir', str(tmp_path / 'run'),
             f'--config.data.train_files={corpus_file}', '--config.data.tokenizer_vocab_size=512',
             '--config.model.vocab_size=512', '--config.model.d_model=32', '--config.model.n_layers=1',
             '--config.model.mlp_dim=64', '--config.data.seq_len=32', '--config.train.steps=3',
             '--config.train.eval_batches=1', '--no-progress')
  assert out.returncode == 0, out.stderr
  assert 'held-out perplexity' in out.stdout and 'unigram baseline' in out.stdout
  assert os.path.isdir(tmp_path / 'run' / 'checkpoints' / '3')
