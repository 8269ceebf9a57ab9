"""Streamed sources (data.streaming, lm/data/streaming.py): local Parquet and jsonl files streamed by
`datasets` as it streams the Hub, read in the random-access path's order when unshuffled, shuffled
and split between hosts by datasets, mixed with a file source, resumed exactly mid-epoch and across
epochs, shown by `lm data show`; and the one-line errors (the Hub offline, what cannot stream, a
checkpoint from another reading)."""

import json
import os
import re

import grain
import jax
import numpy as np
import pytest
from conftest import ROOT

from lm import cli
from lm import config as config_lib
from lm.data import formats, packing, pipeline, sources, streaming
from lm.data import tokenizer as tokenizer_lib
from lm.errors import CheckpointError, ConfigError, DataError
from lm.train import identity

datasets = pytest.importorskip('datasets')  # the [test] extra has it


def _docs(start, n, chars=None):
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  keys = sorted(pydoc_data.topics.topics)[start:start + n]
  return [pydoc_data.topics.topics[k][:chars] for k in keys]


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  """pq/: a Hub-style folder of Parquet shards (train: 60 documents of 80 characters in 'body', test: 4);
  saved/: its train split from save_to_disk; docs.jsonl: 30 other documents, a file; tok.model: a
  tokenizer trained on them."""
  # datasets waits 5 s after a Parquet stream's reader threads finish (an Arrow shutdown issue):
  # each epoch's end and each stream left early would add that here; the reads are the same.
  patch = pytest.MonkeyPatch()
  patch.setattr(datasets.config, 'SLEEP_TIME_ON_THREADS_SHUTDOWN', 0)
  d = tmp_path_factory.mktemp('hf_stream')
  datasets.disable_progress_bars()
  (d / 'pq' / 'data').mkdir(parents=True)
  train = datasets.Dataset.from_dict({'body': _docs(0, 60, 80), 'id': list(range(60))})
  train.to_parquet(str(d / 'pq' / 'data' / 'train-00000-of-00001.parquet'))
  test = datasets.Dataset.from_dict({'body': _docs(60, 4, 300), 'id': list(range(60, 64))})
  test.to_parquet(str(d / 'pq' / 'data' / 'test-00000-of-00001.parquet'))
  train.save_to_disk(str(d / 'saved'))
  with open(d / 'docs.jsonl', 'w', encoding='utf-8') as f:
    for doc in _docs(64, 30, 600):
      f.write(json.dumps({'text': doc}) + '\n')
  tokenizer_lib.train_tokenizer(iter(_docs(0, 94, 600)), str(d / 'tok.model'), 512)
  yield d
  patch.undo()


@pytest.fixture(scope='module')
def tok(folders):
  return tokenizer_lib.Tokenizer(str(folders / 'tok.model'))


def _data(folders, **data):
  c = config_lib.base_config()
  c.data.update(train_files='', seq_len=32, batch_size=4, shuffle_buffer=16, mixture=[
      {'train_files': f'hf:{folders}/pq', 'fields': 'text=body', 'weight': 0.6, 'streaming': 'true',
       'packing': 'whole'},
      {'train_files': str(folders / 'docs.jsonl'), 'weight': 0.4}])
  c.data.update(data)
  return c.data


def test_a_stream_holds_the_random_access_records_in_order_and_packs_the_same_tokens(folders, tok):
  stream = sources.load(f'hf:{folders}/pq', streaming=True)
  records = sources.load(f'hf:{folders}/pq')
  assert isinstance(stream, sources.Stream) and isinstance(records, sources.Records)
  assert list(stream.iterate()) == [records[i] for i in range(len(records))]
  assert list(stream.iterate(start=57)) == [records[i] for i in (57, 58, 59)]
  saved = sources.load(f'hf:{folders}/saved', streaming=True)  # a save_to_disk folder, in shards
  assert saved.dataset.num_shards > 1 and list(saved.iterate()) == list(stream.iterate())
  files = sources.load(str(folders / 'docs.jsonl'), streaming=True)
  assert list(files.iterate()) == list(sources.load(str(folders / 'docs.jsonl')).items)
  text = folders / 'paragraphs.txt'
  text.write_text('one\ntwo\n\n\n  three  \n\nfour\n')
  for split in ('paragraph', 'line'):
    want = sources.load(str(text), text_split=split).items
    assert list(sources.load(str(text), text_split=split, streaming=True).iterate()) == want
  # Packed unshuffled through a stream lane: the rows the random-access path packs.
  encoder = formats.Encoder('text', tok, 32, fields={'text': 'body'})
  lane = streaming.Lane(streaming.Reader(stream, seed=0, shuffle_buffer=0), encoder)
  from_stream = packing.StreamPacker(lane, 32, tok.pad_id, max_empty=10)
  from_records = packing.StreamPacker(grain.MapDataset.source(records).map(encoder), 32, tok.pad_id,
                                      max_empty=10, finite=True)
  rows = packing.pack_all(from_records)
  assert len(rows['tokens']) > 40
  for i in range(len(rows['tokens']) - 1):  # the last is padded where the stream goes on
    row = from_stream.next_row()
    for k in rows:
      np.testing.assert_array_equal(row[k], rows[k][i], err_msg=k)
  # Shuffled by datasets' buffer from the seed: a permutation, the same each time, new each
  # epoch; two hosts read disjoint halves.
  ids = lambda **kw: [r['id'] for r in stream.iterate(shuffle_buffer=16, seed=3, **kw)]  # noqa: E731
  assert sorted(ids()) == list(range(60)) and ids() == ids() != list(range(60))
  assert ids(epoch=1) != ids() and sorted(ids(epoch=1)) == list(range(60))
  for epoch in (0, 1):
    halves = [ids(epoch=epoch, process_index=p, process_count=2) for p in (0, 1)]
    assert sorted(halves[0] + halves[1]) == list(range(60)) and len(halves[0]) == 30
  assert ids(epoch=1, process_index=0, process_count=2) != ids(process_index=0, process_count=2)


def _batches(corpus, n, state=None, prefetch=2, process=(0, 1)):
  it = pipeline.BatchIterator(corpus.train, 4, 0, prefetch=prefetch, process_index=process[0],
                              process_count=process[1])
  if state is not None:
    it.set_state(state)
  got = [next(it) for _ in range(n)]
  state, metrics = json.loads(json.dumps(it.get_state())), it.metrics()
  it.close()
  return got, state, metrics


@pytest.fixture(scope='module')
def corpus(folders, tok):
  """The mixture: pq/ streamed (shuffle buffer 16, packing whole) beside docs.jsonl read whole."""
  return pipeline.build_corpus(_data(folders), tok)


def test_a_streamed_mixture_resumes_exactly_mid_epoch_and_across_epochs(corpus):
  assert re.match(r'data: streamed pq records \(text, packing whole, weight 0\.60\); \d+ docs records',
                  corpus.describe()), corpus.describe()
  assert corpus.train.sources[0].streamed and not corpus.train.sources[1].streamed
  straight, _, metrics = _batches(corpus, 40)
  for n in (5, 30):  # within the first epoch of the stream, and in a later one
    _, state, _ = _batches(corpus, n, prefetch=0)
    assert state['processes'] == 1 and set(state['streams']['0']) == {'0'}
    resumed, _, resumed_metrics = _batches(corpus, 40 - n, state)
    for want, got in zip(straight[n:], resumed):
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f'after {n}: {k}')
  assert resumed_metrics == metrics and metrics['data/tokens_pq'] > 0 and metrics['data/tokens_docs'] > 0
  assert state['streams']['0']['0']['epoch'] >= 1, state['streams']  # the stream went round


def test_two_hosts_stream_disjoint_shares_and_resume_from_one_gathered_state(corpus, monkeypatch):
  # Two hosts: each streams its own half (datasets' split_dataset_by_node) into its two lanes; the
  # state saved gathers both hosts' lanes and stream positions, and each resumes exactly from it.
  readers = [corpus.train.shuffled(0, process_index=p, process_count=2) for p in (0, 1)]
  halves = [{reader.next()[1]['id'] for _ in range(20)} for reader in readers]
  assert len(halves[0]) == len(halves[1]) == 20 and not halves[0] & halves[1]
  hosts = [pipeline.BatchIterator(corpus.train, 4, 0, prefetch=0, process_index=p, process_count=2)
           for p in (0, 1)]
  for it in hosts:
    for _ in range(4):
      next(it)
  local = [it.local_state() for it in hosts]
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(pipeline, '_allgather_json', lambda obj: [
      {'lanes': state['lanes'], 'streams': state['streams']} for state in local])
  state = json.loads(json.dumps(hosts[0].get_state()))
  assert state['processes'] == 2 and set(state['streams']) == {'0', '1'} and len(state['lanes']) == 4
  for p, it in enumerate(hosts):
    want = [next(it) for _ in range(6)]
    got = _batches(corpus, 6, state, process=(p, 2))[0]
    assert len(got[0]['tokens']) == 2
    for a, b in zip(want, got):
      for k in a:
        np.testing.assert_array_equal(b[k], a[k], err_msg=f'process {p}: {k}')


def test_held_out_records_are_chosen_by_content_hash_and_never_trained(corpus):
  # A stream that ends within the scan: round(60 * 0.05) = 3 held out, as a file of 60 would.
  held = {r['id'] for r in streaming.hold_out(corpus.train.sources[0].train, 0.05, 2000, 0)[0]}
  reader = corpus.train.shuffled(0)
  trained = {reader.next()[1]['id'] for _ in range(150)}
  assert len(held) == 3 and not held & trained and len(held | trained) == 60
  # A stream longer than it reads for them: the first max_examples under the hash threshold.
  stream = corpus.train.sources[0].train
  records, keep = streaming.hold_out(stream, 0.2, 3, 0)
  under = [r['id'] for r in stream.iterate() if streaming.record_hash(r, 0) < 0.2 * 2**64]
  assert [r['id'] for r in records] == under[:3] and len(under) > 3
  assert [r['id'] for r in stream.iterate() if not keep(r)] == under


def test_streaming_is_chosen_by_config_and_its_errors_are_one_line(folders, tok, monkeypatch, tmp_path):
  spec = lambda files, **kw: pipeline.source_specs(_data(folders, mixture=(), train_files=files, **kw))[0]  # noqa: E731
  assert not spec(f'hf:{folders}/pq').streamed and spec(f'hf:{folders}/pq', streaming='true').streamed
  assert not spec('someone/tiny').streamed
  import huggingface_hub.constants  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', False)
  assert spec('hf:someone/tiny').streamed  # a Hub name streams while the Hub is reachable
  monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(datasets.config, 'HF_HUB_OFFLINE', True)
  assert not spec('hf:someone/tiny').streamed  # offline: the download path, which finds a cached one
  with pytest.raises(ConfigError, match=r"data.streaming='yes'; choose one of \('auto', 'true', 'false'\)"):
    spec('a.jsonl', streaming='yes')
  with pytest.raises(DataError, match=r"^hf:someone/tiny: cannot stream 'someone/tiny' from the Hugging "
                     r'Face Hub \(.*OfflineModeIsEnabled.*\); without a network, save it .* use hf:DIR$'):
    sources.load('hf:someone/tiny', streaming=True)
  with pytest.raises(DataError, match=r'^tfds:mnist: data.streaming=true applies to hf: datasets and '
                     r'local data files; tfds: sources are read with random access'):
    sources.load('tfds:mnist', streaming=True)
  (folders / 'bad.jsonl').write_text('{"text": "a"}\n{"text": "b"\n')
  with pytest.raises(DataError, match=r'^\S+bad.jsonl: cannot read the stream after 0 records \(JSON parse '
                     r'error: .*\); fix the data, or read it without data.streaming'):
    list(sources.load(str(folders / 'bad.jsonl'), streaming=True).iterate())
  with pytest.raises(DataError, match=r"must share a format \(got \['json', 'parquet'\]\)"):
    sources.load(f'{folders}/docs.jsonl,{folders}/pq/data/test-00000-of-00001.parquet', streaming=True)
  # A field the stream's first record lacks, before a tokenizer is trained on it.
  with pytest.raises(DataError, match=re.escape(
      f"hf:{folders}/pq[streamed record 0]: no string field 'text' (has ['body', 'id']); set "
      'data.text_field or data.fields="text=COLUMN"')):
    pipeline.load_tokenizer(_data(folders, mixture=(), train_files=f'hf:{folders}/pq', streaming='true'),
                            str(tmp_path))
  # A checkpoint's data state from another reading of the source, or another process count.
  streamed = pipeline.build_corpus(_data(folders), tok)
  _, state, _ = _batches(streamed, 2, prefetch=0)
  random_access = pipeline.build_corpus(_data(folders, mixture=[
      {**dict(m.items()), 'streaming': 'false'} for m in _data(folders).mixture]), tok)
  with pytest.raises(DataError, match=r'^pq: the checkpoint read this source as a stream; resume with '
                     r'data.streaming=true'):
    _batches(random_access, 1, state)
  _, random_state, _ = _batches(random_access, 2, prefetch=0)
  with pytest.raises(DataError, match=r'^pq: the checkpoint read this source with random access'):
    _batches(streamed, 1, random_state)
  with pytest.raises(DataError, match=r'streamed its data on 2 processes, not 1'):
    _batches(streamed, 1, {**state, 'processes': 2})


def test_a_run_cannot_resume_with_another_shuffle_buffer(tok, tmp_path):
  """Resuming reads the stream again from saved positions: another buffer would put other records
  there, silently. The run's identity names the change (and runs recorded before the key resume)."""
  c = config_lib.base_config()
  identity.record(str(tmp_path), identity.of(c, tok))
  identity.check(str(tmp_path), identity.of(c, tok), '')
  c.data.shuffle_buffer = 16
  with pytest.raises(CheckpointError, match=r'another data \(data.shuffle_buffer: None there, 16 now\)'):
    identity.check(str(tmp_path), identity.of(c, tok), '')
  identity.check(str(tmp_path), identity.of(c, tok), 'data')


def test_data_show_shows_a_streamed_source(folders, capsys):
  code = cli.main(['data', 'show', '--config', os.path.join(ROOT, 'configs', 'quickstart.py'),
                   '--examples', '1', '--batches', '1', f'--config.data.train_files=hf:{folders}/pq',
                   '--config.data.streaming=true', '--config.data.fields=text=body',
                   f'--config.data.tokenizer={folders}/tok.model', '--config.model.vocab_size=512',
                   '--config.data.seq_len=32', '--config.data.batch_size=2'])
  out = capsys.readouterr().out
  assert code == 0, out
  assert re.search(r'^data: streamed pq records \(text, packing stream, weight 1\.00\); \d+ held-out rows',
                   out, re.M), out
  assert re.search(r'--- row 0, \d+ tokens', out), out
