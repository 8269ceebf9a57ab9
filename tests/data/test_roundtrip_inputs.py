"""Tokenizers lm trains round-trip any text; compressed inputs read transparently; HH-RLHF
dialogues are preference pairs; `lm data show` follows train.init_from as `lm train` does."""

import gzip
import inspect
import json
import os
import textwrap

import pytest
import zstandard
from conftest import ROOT

from lm import cli
from lm.data import preference, sources
from lm.data import tokenizer as tokenizer_lib
from lm.errors import DataError

SHARED = os.environ.get('LM_SHARED_DATA', os.path.join(ROOT, '..', 'shared', 'data'))
GSM8K = os.path.join(SHARED, 'gsm8k', 'train.jsonl')


def test_trained_tokenizer_round_trips_code_whitespace_and_unicode(tmp_path):
  source = inspect.getsource(json.decoder)
  docs = [source, inspect.getsource(textwrap)]
  samples = [source, 'def f():\n    return 1', '\tx\t\ty  \n\n\n  z   ', '  two leading',
             'naïve café — 数学 😀 ﬁ ①', 'a\r\nb']
  if os.path.isfile(GSM8K):  # GSM8K's line structure and <<48/2=24>> notes survive
    with open(GSM8K, encoding='utf-8') as f:
      rows = [json.loads(next(f)) for _ in range(50)]
    docs += [r['question'] + '\n' + r['answer'] for r in rows]
    samples += [r['question'] + '\n' + r['answer'] for r in rows[:10]]
  tok = tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'sp.model'), 512)
  for text in samples:
    assert tok.decode(tok.encode(text)) == text
  # Indentation and newlines are pieces, not bytes: the layout costs few tokens.
  assert len(tok.encode('\n    return 1')) < len('\n    return 1')


@pytest.mark.parametrize('suffix', ['.jsonl.gz', '.jsonl.zst', '.txt.gz'])
def test_compressed_files_read_as_their_inner_format(tmp_path, suffix):
  rows = [{'text': 'first document'}, {'text': 'second\n\tdocument'}]
  raw = (''.join(json.dumps(r) + '\n' for r in rows) if 'jsonl' in suffix
         else 'first document\n\nsecond\n\tdocument\n').encode()
  packed = gzip.compress(raw) if suffix.endswith('.gz') else zstandard.ZstdCompressor().compress(raw)
  path = tmp_path / f'data{suffix}'
  path.write_bytes(packed)
  records = sources.load(str(path))
  assert [records[i]['text'] for i in range(len(records))] == [r['text'] for r in rows]
  assert records.where(1).startswith(str(path))


@pytest.mark.parametrize('suffix', ['.jsonl.gz', '.jsonl.zst'])
def test_unreadable_compressed_file_is_one_line(tmp_path, suffix):
  path = tmp_path / f'data{suffix}'
  path.write_bytes(b'\x1f\x8b\x08\x00\x28\xb5\x2f\xfd truncated')
  with pytest.raises(DataError) as e:
    sources.load(str(path))
  assert str(path) in str(e.value) and 're-compress it' in str(e.value) and '\n' not in str(e.value)


def test_hh_rlhf_dialogues_are_preference_pairs():
  record = {'chosen': '\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 6.',
            'rejected': '\n\nHuman: What is 2+2?\n\nAssistant: 4.\n\nHuman: And 3+3?\n\nAssistant: 7.'}
  prompt, chosen, rejected = preference.from_record(record, {}, 'x')
  assert prompt == [{'role': 'user', 'content': 'What is 2+2?'},
                    {'role': 'assistant', 'content': '4.'},
                    {'role': 'user', 'content': 'And 3+3?'}]
  assert (chosen, rejected) == ('6.', '7.')
  with pytest.raises(DataError, match='start with the same prompt'):
    preference.from_record({**record, 'rejected': '\n\nHuman: Other?\n\nAssistant: 7.'}, {}, 'x')


def test_data_show_uses_the_init_from_runs_tokenizer(tmp_path, monkeypatch, capsys):
  """A run named by train.init_from supplies the tokenizer (and model shape): data show must not
  train a fresh tokenizer, which training would not use."""
  run = tmp_path / 'base'
  (run / 'checkpoints').mkdir(parents=True)
  docs = [inspect.getsource(json.decoder)]
  tokenizer_lib.train_tokenizer(docs, str(run / 'tokenizer.model'), 400)
  model = {'vocab_size': 400, 'd_model': 32, 'n_layers': 1, 'n_heads': 2, 'n_kv_heads': 1,
           'mlp_dim': 64, 'max_seq_len': 64}
  (run / 'config.json').write_text(json.dumps({'model': model}))
  data = tmp_path / 'ft.jsonl'
  data.write_text(''.join(json.dumps({'text': d}) + '\n' for d in docs * 4))

  def no_training(*args, **kwargs):
    raise AssertionError('lm data show trained a tokenizer that training would not use')

  monkeypatch.setattr(tokenizer_lib, 'train_tokenizer', no_training)
  code = cli.main(['data', 'show', '--config', os.path.join(ROOT, 'configs', 'quickstart.py'),
                   f'--config.train.init_from={run}', f'--config.data.train_files={data}',
                   '--config.data.seq_len=32', '--config.data.batch_size=2', '--examples', '1',
                   '--batches', '1'])
  assert code == 0 and '--- row' in capsys.readouterr().out
