"""Experiment trackers (lm/train/trackers.py): W&B in offline mode and Trackio's local database get
the resolved config, every step's metrics, the evaluations and the summary; a resumed run continues
the same tracker run; bad tracker settings are one line before training."""

import glob
import json
import struct

import pytest
from conftest import tiny_config

from lm.errors import ConfigError, UserError
from lm.train import loop as train_lib
from lm.train import trackers
from lm.train.metrics import read_metrics

wandb_proto = pytest.importorskip('wandb.proto.wandb_internal_pb2')  # the [test] extra has it
trackio_storage = pytest.importorskip('trackio.sqlite_storage')


@pytest.fixture(scope='module')
def corpus_file(tmp_path_factory):
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp('data') / 'docs.jsonl'
  with open(path, 'w', encoding='utf-8') as f:
    for key in sorted(pydoc_data.topics.topics)[:40]:
      f.write(json.dumps({'text': pydoc_data.topics.topics[key]}) + '\n')
  return str(path)


def _config(corpus, steps):
  c = tiny_config(vocab_size=512, max_seq_len=64)
  c.data.update(train_files=corpus, tokenizer_vocab_size=512, seq_len=32, batch_size=8)
  c.train.update(steps=steps, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2,
                 trackers='tensorboard,wandb,trackio')
  c.metrics.update(peak_flops_per_device=1e12)
  c.mesh.shape.update(data=-1)
  return c


def wandb_records(path):
  """The records of a W&B run file (run-ID.wandb): a LevelDB-style log of 32 KiB blocks, each
  record a 7-byte header (CRC, length, kind: 1 whole, 2 first, 3 middle, 4 last piece) and a
  protobuf `Record`, after a 7-byte file header."""
  with open(path, 'rb') as f:
    raw = f.read()
  pos, pieces = 7, b''
  while pos + 7 <= len(raw):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack('<IHB', raw[pos:pos + 7])
    data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 2):
      pieces = data
    elif kind in (3, 4):
      pieces += data
    if kind in (1, 4):
      record = wandb_proto.Record()
      record.ParseFromString(pieces)
      yield record


def _key(item) -> str:
  return item.key or '/'.join(item.nested_key)  # W&B sends a key either way


def _wandb_run(folder):
  """(run id, config, {step: history row}, summary, exit code) of an offline run folder."""
  run_id, config, history, summary, exit_code = None, {}, {}, {}, None
  for record in wandb_records(glob.glob(f'{folder}/run-*.wandb')[0]):
    kind = record.WhichOneof('record_type')
    if kind == 'run':
      run_id = record.run.run_id
      config.update({_key(i): json.loads(i.value_json) for i in record.run.config.update})
    elif kind == 'history':
      row = {_key(i): json.loads(i.value_json) for i in record.history.item}
      history[row['_step']] = row
    elif kind == 'summary':
      summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    elif kind == 'exit':
      exit_code = record.exit.exit_code
  return run_id, config, history, summary, exit_code


def test_wandb_offline_and_trackio_get_everything_and_a_resumed_run_continues_them(
    tmp_path, monkeypatch, corpus_file):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.setenv('WANDB_CONSOLE', 'off')  # pytest owns stdout and stderr here
  # Trackio's folder is read when it is first imported; this test's own, however it was.
  monkeypatch.setattr(trackio_storage, 'TRACKIO_DIR', tmp_path / 'trackio')
  (tmp_path / 'trackio').mkdir()
  workdir = tmp_path / 'run'
  train_lib.train(_config(corpus_file, 2), str(workdir), progress=False)
  summary = train_lib.train(_config(corpus_file, 4), str(workdir), progress=False)  # resumes

  record = json.loads((workdir / 'trackers.json').read_text())
  assert record['project'] == 'lm' and record['name'] == 'run'
  rows = read_metrics(str(workdir))
  losses = {r['step']: r['loss'] for r in rows if 'loss' in r}
  evals = {r['step']: r['eval_loss'] for r in rows if 'eval_loss' in r}
  assert sorted(losses) == [1, 2, 3, 4] and sorted(evals) == [2, 4]

  # W&B: one offline folder per process, both for the same run id (what `wandb sync` uploads).
  folders = sorted(glob.glob(f'{workdir}/wandb/offline-run-*-{record["id"]}'))
  assert len(folders) == 2
  runs = [_wandb_run(f) for f in folders]
  assert [r[0] for r in runs] == [record['id']] * 2 and [r[4] for r in runs] == [0, 0]
  config = runs[1][1]
  assert config['model']['d_model'] == 32 and config['train']['steps'] == 4
  history = {**runs[0][2], **runs[1][2]}
  assert sorted(runs[0][2]) == [1, 2] and sorted(runs[1][2]) == [3, 4]
  assert {s: history[s]['loss'] for s in losses} == losses
  assert {s: history[s]['eval_loss'] for s in evals} == evals
  assert runs[1][3]['eval_perplexity'] == summary['eval_perplexity']
  assert runs[1][3]['unigram_perplexity'] == summary['unigram_perplexity']

  # Trackio: one run, its steps from both processes, the config and the summary.
  logs = trackio_storage.SQLiteStorage.get_logs('lm', 'run')
  assert {r['step']: r['loss'] for r in logs if 'loss' in r} == losses
  assert {r['step']: r['eval_loss'] for r in logs if 'eval_loss' in r} == evals
  # Each process's summary at its last step (2, then 4): the resumed run's is the final one.
  summaries = {r['step']: r['summary/eval_perplexity'] for r in logs if 'summary/eval_perplexity' in r}
  assert sorted(summaries) == [2, 4] and summaries[4] == summary['eval_perplexity']
  assert trackio_storage.SQLiteStorage.get_run_config('lm', 'run')['model']['d_model'] == 32


def test_unknown_or_uninstalled_trackers_are_config_errors(monkeypatch):
  c = tiny_config()
  c.train.trackers = 'tensorboard,wandbb'
  with pytest.raises(ConfigError, match="unknown tracker 'wandbb'; choose from tensorboard, wandb, trackio"):
    trackers.names(c)
  c.train.trackers = 'wandb'
  monkeypatch.setattr(trackers.importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(ConfigError, match=r'wandb needs the wandb package, which is not installed; '
                     r'pip install wandb'):
    trackers.names(c)
  monkeypatch.undo()
  c.train.trackers = ' TensorBoard, wandb,,wandb '
  assert trackers.names(c) == ['tensorboard', 'wandb']
  c.metrics.tensorboard = False  # the older switch still turns TensorBoard off
  assert trackers.names(c) == ['wandb']


class _Broken:

  def __init__(self, workdir, config, run):
    raise RuntimeError('no API key configured\nsecond line')


def test_a_tracker_that_fails_to_start_stops_the_run_or_is_dropped_when_told(
    tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(trackers.KINDS, 'wandb', _Broken)
  c = tiny_config()
  c.train.trackers = 'tensorboard,wandb'
  with pytest.raises(UserError, match=r'^train.trackers: wandb failed to start \(RuntimeError: no API '
                     r'key configured\); fix it, or set train.tracker_errors=warn to train without it$'):
    trackers.Trackers(str(tmp_path), c, trackers.names(c))
  c.train.tracker_errors = 'warn'
  started = trackers.Trackers(str(tmp_path), c, trackers.names(c))
  assert list(started.active) == ['tensorboard']
  assert capsys.readouterr().err == ('lm: warning: train.trackers: wandb failed to start '
                                     '(RuntimeError: no API key configured); training without it '
                                     '(train.tracker_errors=warn)\n')
  started.finish({'step': 1}, failed=False)


def test_wandb_mode_is_read_at_each_run_not_frozen_by_the_first(tmp_path, monkeypatch):
  # wandb keeps process-wide settings from its first init; a later run in the same process (a
  # sweep, a notebook, this test session) with another WANDB_MODE must still get that mode.
  monkeypatch.setenv('WANDB_CONSOLE', 'off')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  run = {'project': 'lm', 'name': 'a', 'id': 'modecheck1'}
  monkeypatch.setenv('WANDB_MODE', 'online')
  monkeypatch.setenv('WANDB_API_KEY', '')
  with pytest.raises(Exception, match='API key'):
    trackers.KINDS['wandb'](str(tmp_path), {}, run)
  monkeypatch.setenv('WANDB_MODE', 'offline')
  started = trackers.KINDS['wandb'](str(tmp_path), {'x': 1}, run)
  started.log(1, {'loss': 2.0})
  started.finish({'step': 1}, failed=False)
  assert len(glob.glob(f'{tmp_path}/wandb/offline-run-*-modecheck1')) == 1
