"""Sources: local files and globs, TFDS through array_record, provenance, and bad data."""

import json
import re

import numpy as np
import pytest
from data_util import (C4, GSM8K, SHAKESPEARE, WIKI, data_config, head_lines, make_tfds,
                       needs_shared, slice_json)

from lm.data import pipeline, sources
from lm.data import tokenizer as tokenizer_lib
from lm.errors import DataError


def test_text_files_split_into_documents_by_paragraph_line_or_file(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('first para\nline two\n\n\n  \nsecond para\n\nthird\n')
  docs = sources.load(str(path))
  assert [r['text'] for r in docs.items] == ['first para\nline two', 'second para', 'third']
  assert docs.where(1) == f'{path}:6' and docs.where(0) == f'{path}:1'
  assert len(sources.load(str(path), text_split='line')) == 4
  assert len(sources.load(str(path), text_split='file')) == 1


def test_globs_and_lists_and_missing_files(tmp_path):
  for name in ('b.txt', 'a.txt'):
    (tmp_path / name).write_text(f'{name}\n')
  docs = sources.load(str(tmp_path / '*.txt'))
  assert [r['text'] for r in docs.items] == ['a.txt', 'b.txt']  # sorted
  assert len(sources.load(f'{tmp_path}/a.txt, {tmp_path}/b.txt')) == 2
  with pytest.raises(DataError, match='not found'):
    sources.load(str(tmp_path / 'nothing*.jsonl'))


def test_malformed_json_lines_fail_with_file_and_line_or_are_skipped_and_counted(tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text('{"text": "ok"}\n{"text": broken\n\n[1, 2]\n{"text": "fine"}\n')
  with pytest.raises(DataError, match=rf'{path}:2: malformed JSON'):
    sources.load(str(path))
  records = sources.load(str(path), bad_records='skip')
  assert [r['text'] for r in records.items] == ['ok', 'fine']
  assert records.skipped == {'malformed JSON lines': 1, 'lines that are not JSON objects': 1}
  assert f'(first: {path}:2)' in records.skipped_summary()
  assert records.where(1) == f'{path}:5'


def test_non_utf8_bytes(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(DataError, match=rf'{path}:2: .*not valid UTF-8'):
    sources.load(str(path))
  assert len(sources.load(str(path), bad_records='skip')) == 1
  text = tmp_path / 'bad.txt'
  text.write_bytes(b'hello\n\nsecond \xff\xfe paragraph\n')
  with pytest.raises(DataError, match=rf'{text}:3: .*not valid UTF-8'):
    sources.load(str(text))
  records = sources.load(str(text), bad_records='skip')
  assert records.items[1]['text'] == 'second \ufffd\ufffd paragraph' and sum(records.skipped.values()) == 1


def test_json_list_json_lines_named_json_and_wrapped_lists(tmp_path):
  (tmp_path / 'list.json').write_text(json.dumps([{'text': 'a'}, {'text': 'b'}]))
  (tmp_path / 'lines.json').write_text('{"text": "a"}\n{"text": "b"}\n')
  (tmp_path / 'wrapped.json').write_text(json.dumps({'data': [{'text': 'a'}]}))
  assert len(sources.load(str(tmp_path / 'list.json'))) == 2
  assert sources.load(str(tmp_path / 'list.json')).where(1).endswith('list.json[record 1]')
  assert len(sources.load(str(tmp_path / 'lines.json'))) == 2
  assert len(sources.load(str(tmp_path / 'wrapped.json'))) == 1


def test_parquet(tmp_path):
  pa = pytest.importorskip('pyarrow')
  import pyarrow.parquet as pq
  path = tmp_path / 'd.parquet'
  pq.write_table(pa.table({'question': ['q1', 'q2'], 'answer': ['a1', 'a2']}), path)
  records = sources.load(str(path))
  assert records.items == [{'question': 'q1', 'answer': 'a1'}, {'question': 'q2', 'answer': 'a2'}]


@needs_shared
def test_real_files_load():
  assert len(sources.load(SHAKESPEARE)) == 7222
  assert len(sources.load(WIKI, text_split='line')) == 30
  c4 = sources.load(C4)
  assert len(c4) == 300 and isinstance(c4[0]['text'], str)
  gsm = sources.load(GSM8K)
  assert len(gsm) == 7473 and set(gsm[0]) == {'question', 'answer'}


@needs_shared
def test_field_mapping_and_missing_fields(tmp_path):
  gsm = slice_json(GSM8K, tmp_path / 'gsm.jsonl', 40)
  tok = tokenizer_lib.Tokenizer(tokenizer_path())
  cfg = data_config(train_files=gsm, format='alpaca', fields='instruction=question,output=answer')
  corpus = pipeline.build_corpus(cfg.data, tok)
  assert len(corpus.train.sources[0].train) == 38
  cfg = data_config(train_files=gsm, format='alpaca')
  with pytest.raises(DataError, match=r'gsm.jsonl:1: no field .instruction.*data.fields'):
    pipeline.build_corpus(cfg.data, tok)
  with pytest.raises(DataError, match='NAME=COLUMN'):
    pipeline.build_corpus(data_config(train_files=gsm, format='alpaca', fields='question').data, tok)


def tokenizer_path():
  from data_util import LLAMA2
  return LLAMA2


@needs_shared
def test_tfds_source_through_array_record_without_tensorflow(tmp_path):
  docs = [p.strip() for p in ''.join(head_lines(SHAKESPEARE, 600)).split('\n\n') if p.strip()]
  name = make_tfds(tmp_path, docs)
  records = sources.load(f'tfds:{name}', data_dir=str(tmp_path))
  assert len(records) == len(docs) * 9 // 10
  texts = {records[i]['text'] for i in range(len(records))}
  assert texts <= set(docs) and isinstance(records[0]['id'], (int, np.integer))
  assert len(sources.load(f'tfds:{name}:validation', data_dir=str(tmp_path))) == len(docs) - len(records)
  assert len(sources.load(f'tfds:{name}:1.0.0:train[:10]', data_dir=str(tmp_path))) == 10
  # The whole pipeline reads it: train and validation splits as train_files / eval_files.
  cfg = data_config(train_files=f'tfds:{name}', eval_files=f'tfds:{name}:validation',
                    tfds_data_dir=str(tmp_path), seq_len=64)
  corpus = pipeline.build_corpus(cfg.data, tokenizer_lib.Tokenizer(tokenizer_path()))
  batch = next(pipeline.BatchIterator(corpus.train, 4, 0))
  assert batch['tokens'].shape == (4, 64) and corpus.eval['tokens'].shape[0] >= 1
  # Records read lazily (TFDS) share one schema: a field the first lacks fails at once, naming the
  # record; under bad_records=skip they are skipped and counted as they are encoded.
  with pytest.raises(DataError, match=re.escape(f"tfds:{name}[0]: no field 'instruction' (has ['id', "
                                                "'text']); map it with")):
    pipeline.build_corpus(data_config(train_files=f'tfds:{name}', format='alpaca',
                                      tfds_data_dir=str(tmp_path)).data, tokenizer_lib.Tokenizer(tokenizer_path()))
  with pytest.raises(DataError, match='no usable examples.*bad records'):
    pipeline.build_corpus(data_config(train_files=f'tfds:{name}', format='alpaca', bad_records='skip',
                                      tfds_data_dir=str(tmp_path)).data, tokenizer_lib.Tokenizer(tokenizer_path()))
  with pytest.raises(DataError, match='cannot open TFDS dataset'):
    sources.load('tfds:no_such_dataset', data_dir=str(tmp_path))


def test_builtin_and_unknown_builtin():
  with pytest.raises(DataError, match='unknown built-in corpus'):
    sources.load('builtin:nope')


def test_python_docs_are_parsed_once_per_python_and_kept_on_disk(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, 'PYTHON_DOCS_CACHE', str(tmp_path))
  sources.python_docs.cache_clear()
  parsed = sources.python_docs()
  (cached,) = tmp_path.glob('*.json')
  sources.python_docs.cache_clear()
  monkeypatch.setattr(sources, '_parse_python_docs', lambda root: pytest.fail('parsed again'))
  assert sources.python_docs() == parsed and len(parsed) > 2000  # read back, not parsed
  cached.write_text('{"torn')  # a damaged file is parsed again and rewritten
  monkeypatch.undo()
  monkeypatch.setattr(sources, 'PYTHON_DOCS_CACHE', str(tmp_path))
  sources.python_docs.cache_clear()
  assert sources.python_docs() == parsed and json.loads(cached.read_text()) == list(parsed)
  sources.python_docs.cache_clear()


def test_records_without_and_subset_keep_provenance(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('\n'.join(f'doc {i}' for i in range(10)))
  records = sources.load(str(path), text_split='line')
  kept = records.without(np.array([0, 3, 4, 9]))
  assert [kept[i]['text'] for i in range(len(kept))] == ['doc 1', 'doc 2', 'doc 5', 'doc 6', 'doc 7', 'doc 8']
  assert kept.where(2) == f'{path}:6'
  sub = records.subset(np.array([9, 0]))
  assert [sub[i]['text'] for i in range(2)] == ['doc 9', 'doc 0'] and sub.where(0) == f'{path}:10'


@needs_shared
def test_text_records_missing_their_field_or_empty(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text('{"text": "a fine document"}\n{"text": ""}\n{"body": "no text field"}\n'
                  + ''.join(json.dumps({'text': f'document {i}'}) + '\n' for i in range(20)))
  tok = tokenizer_lib.Tokenizer(tokenizer_path())
  with pytest.raises(DataError, match=rf"{path}:3: no string field 'text'.*data.text_field"):
    pipeline.build_corpus(data_config(train_files=str(path)).data, tok)
  corpus = pipeline.build_corpus(data_config(train_files=str(path), bad_records='skip').data, tok)
  assert len(corpus.train.sources[0].train) + len(corpus.train.sources[0].eval) == 21
  assert '1 empty documents' in corpus.describe() and "no string field 'text'" in corpus.describe()
