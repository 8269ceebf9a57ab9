"""Hugging Face datasets as a source (lm/data/sources.py `hf:`): save_to_disk folders, Arrow and
Parquet folders and Hub names, through the same pipeline as files: field mapping, mixtures, exact
resume, `lm data show`; folders that are not datasets, scripts and an offline Hub are one line."""

import json
import os
import re
import shutil

import pytest
from conftest import ROOT, tiny_config

from lm import cli
from lm.data import sources
from lm.errors import DataError
from lm.train import loop as train_lib
from lm.train.metrics import read_metrics

datasets = pytest.importorskip('datasets')  # the [test] extra has it


def _docs(start, n):
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  keys = sorted(pydoc_data.topics.topics)[start:start + n]
  return [pydoc_data.topics.topics[k] for k in keys]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """saved/: a DatasetDict (train, test) with the text in column 'body'; one/: a Dataset;
  parquet/: a Hub-style folder of Parquet shards; docs.jsonl: other documents, as a file."""
  d = tmp_path_factory.mktemp('hf')
  datasets.disable_progress_bars()
  train = datasets.Dataset.from_dict({'body': _docs(0, 40), 'id': list(range(40))})
  test = datasets.Dataset.from_dict({'body': _docs(40, 4), 'id': list(range(40, 44))})
  datasets.DatasetDict({'train': train, 'test': test}).save_to_disk(str(d / 'saved'))
  train.rename_column('body', 'text').save_to_disk(str(d / 'one'))
  (d / 'parquet' / 'data').mkdir(parents=True)
  train.to_parquet(str(d / 'parquet' / 'data' / 'train-00000-of-00001.parquet'))
  test.to_parquet(str(d / 'parquet' / 'data' / 'test-00000-of-00001.parquet'))
  with open(d / 'docs.jsonl', 'w', encoding='utf-8') as f:
    for doc in _docs(44, 30):
      f.write(json.dumps({'text': doc}) + '\n')
  return d


def test_save_to_disk_arrow_and_parquet_folders_read_as_records(folders):
  whole = _docs(0, 40)
  saved = sources.load(f'hf:{folders}/saved')  # a DatasetDict: its train split by default
  assert len(saved) == 40 and saved[3] == {'body': whole[3], 'id': 3}
  assert saved.where(3) == f'hf:{folders}/saved[3]'
  test = sources.load(f'hf:{folders}/saved:test')
  assert [test[i]['id'] for i in range(len(test))] == [40, 41, 42, 43]
  one = sources.load(f'hf:{folders}/one')  # one Dataset
  assert len(one) == 40 and one[39]['text'] == whole[39]
  parquet = sources.load(f'hf:{folders}/parquet:test')
  assert [parquet[i]['body'] for i in range(4)] == _docs(40, 4)
  # Arrow files alone (no state.json): the datasets library's own reader.
  arrow = folders / 'arrow'
  arrow.mkdir(exist_ok=True)
  for name in os.listdir(folders / 'saved' / 'train'):
    if name.endswith('.arrow'):
      shutil.copy(folders / 'saved' / 'train' / name, arrow / name)
  records = sources.load(f'hf:{arrow}')
  assert len(records) == 40 and records[5]['body'] == whole[5]


def test_what_is_not_a_dataset_is_one_line(folders, tmp_path, monkeypatch):
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'readme.txt').write_text('hello')
  (tmp_path / 'scripted').mkdir()
  (tmp_path / 'scripted' / 'scripted.py').write_text('raise SystemExit("a dataset script ran")\n')
  (tmp_path / 'scripted' / 'data.parquet').write_bytes(b'')
  cases = {
      f'hf:{tmp_path}/notes': 'is not a dataset folder (no state.json or dataset_dict.json from '
                              'save_to_disk, no .arrow or .parquet files)',
      f'hf:{tmp_path}/scripted': 'holds a dataset loading script (scripted.py); lm never runs '
                                 'dataset scripts',
      f'hf:{folders}/saved:validation': "no split 'validation' (splits: train, test)",
      f'hf:{folders}/one:test': 'holds one Dataset, not splits; drop :test',
      f'hf:{tmp_path}/typo': "no folder '" + str(tmp_path / 'typo') + "' and not a Hub dataset name",
      f'hf:{folders}/docs.jsonl': 'is a file; hf: takes a dataset folder or a Hub dataset name',
  }
  for spec, message in cases.items():
    with pytest.raises(DataError, match=re.escape(message)):
      sources.load(spec)
  # The Hub, offline (as CI and this machine are): one line saying what to do instead.
  import huggingface_hub.constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
  with pytest.raises(DataError, match=r"^hf:someone/tiny:test: cannot load 'someone/tiny' from the "
                     r'Hugging Face Hub \(.*OfflineModeIsEnabled.*\); without a network, save it '
                     r'elsewhere .*use hf:DIR$'):
    sources.load('hf:someone/tiny:test')


def _config(folders, steps):
  c = tiny_config(vocab_size=512, max_seq_len=64)
  # A mixture: the save_to_disk folder (its text in 'body', mapped) beside a jsonl file.
  c.data.update(train_files='', tokenizer_vocab_size=512, seq_len=32, batch_size=8, mixture=[
      {'train_files': f'hf:{folders}/saved', 'fields': 'text=body', 'weight': 0.7},
      {'train_files': str(folders / 'docs.jsonl'), 'weight': 0.3}])
  c.train.update(steps=steps, log_every=1, eval_every=1000, eval_batches=1, checkpoint_every=3)
  c.metrics.update(peak_flops_per_device=1e12)
  c.mesh.shape.update(data=-1)
  return c


def test_a_run_from_a_save_to_disk_folder_resumes_exactly(folders, tmp_path):
  train_lib.train(_config(folders, 6), str(tmp_path / 'straight'), progress=False)
  train_lib.train(_config(folders, 3), str(tmp_path / 'resumed'), progress=False)
  train_lib.train(_config(folders, 6), str(tmp_path / 'resumed'), progress=False)
  straight = {m['step']: m for m in read_metrics(str(tmp_path / 'straight')) if 'loss' in m}
  resumed = {m['step']: m for m in read_metrics(str(tmp_path / 'resumed')) if 'loss' in m}
  assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4, 5, 6]
  # Bit-identical: the same records, in the same order, packed into the same rows.
  assert [resumed[s]['loss'] for s in range(1, 7)] == [straight[s]['loss'] for s in range(1, 7)]
  for name in ('saved', 'docs'):  # both sources fed the batches
    assert resumed[6][f'data/tokens_{name}'] == straight[6][f'data/tokens_{name}'] > 0
  print('losses', [straight[s]['loss'] for s in range(1, 7)])


def test_data_show_shows_a_hub_style_parquet_folder(folders, capsys):
  code = cli.main(['data', 'show', '--config', os.path.join(ROOT, 'configs', 'quickstart.py'),
                   '--examples', '1', '--batches', '1', f'--config.data.train_files=hf:{folders}/parquet',
                   '--config.data.fields=text=body', '--config.data.tokenizer_vocab_size=512',
                   '--config.model.vocab_size=512', '--config.data.seq_len=64',
                   '--config.data.batch_size=2'])
  out = capsys.readouterr().out
  assert code == 0, out
  assert '40 parquet records' in out or re.search(r'\b\d+ parquet records', out), out
  assert re.search(r'packing efficiency \d+\.\d%', out)


def test_a_missing_field_is_one_line_before_training(folders, capsys, tmp_path):
  code = cli.main(['train', '--config', os.path.join(ROOT, 'configs', 'quickstart.py'),
                   '--workdir', str(tmp_path / 'run'), f'--config.data.train_files=hf:{folders}/saved',
                   '--config.data.tokenizer_vocab_size=512', '--config.model.vocab_size=512'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and not (tmp_path / 'run').exists()
  assert err == (f"lm: error: hf:{folders}/saved[0]: no string field 'text' (has ['body', 'id']); "
                 'set data.text_field or data.fields="text=COLUMN"')
