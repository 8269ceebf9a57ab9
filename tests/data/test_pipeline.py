"""The pipeline: exact resume, per-process shares, prefetch, config plumbing and clear errors."""

import json

import numpy as np
import pytest
from data_util import ALPACA, LLAMA2, SHAKESPEARE, WIKI, data_config, head_lines, needs_shared, slice_json

from lm.data import packing, pipeline
from lm.data.show import segments
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError, DataError

pytestmark = needs_shared


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.load(LLAMA2)


@pytest.fixture(scope='module')
def shakespeare(tmp_path_factory):
  path = tmp_path_factory.mktemp('data') / 'shakespeare.txt'
  path.write_text(''.join(head_lines(SHAKESPEARE, 6000)))
  return str(path)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _resume_check(make, n=7, m=6):
  """Batches after restoring the JSON state of batch n equal those of an uninterrupted run."""
  it = make()
  for _ in range(n):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
  expected = [next(it) for _ in range(m)]
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    _same(next(resumed), want)
  it.close()
  resumed.close()
  return expected


def test_batches_have_the_step_format(tok, shakespeare):
  corpus = pipeline.build_corpus(data_config(train_files=shakespeare, seq_len=64).data, tok)
  batch = next(pipeline.BatchIterator(corpus.train, 4, 0))
  assert set(batch) == set(packing.BATCH_KEYS)
  for k, v in batch.items():
    assert v.shape == (4, 64) and v.dtype == packing.DTYPES[k]
  for k, v in corpus.eval.items():
    assert v.shape[1] == 64 and v.dtype == packing.DTYPES[k]


@pytest.mark.parametrize('prefetch', [0, 3])
def test_resume_after_n_batches_yields_identical_batches(tok, shakespeare, prefetch):
  corpus = pipeline.build_corpus(data_config(train_files=shakespeare, seq_len=128).data, tok)
  _resume_check(lambda: pipeline.BatchIterator(corpus.train, 4, 0, prefetch=prefetch))


def test_resume_across_epochs_and_with_whole_packing(tok, tmp_path):
  path = slice_json(ALPACA, tmp_path / 'a.json', 40)
  corpus = pipeline.build_corpus(data_config(train_files=path, format='alpaca', seq_len=256,
                                             eval_fraction=0.1).data, tok)
  # 36 records in 4 lanes of ~3 examples per row: 7 batches cross an epoch boundary.
  _resume_check(lambda: pipeline.BatchIterator(corpus.train, 4, 0), n=7, m=8)


def test_two_processes_read_disjoint_shares_that_form_the_global_batch(tok, shakespeare):
  """Process p of 2 builds only its lanes: the records it reads are disjoint from the other's,
  its rows are its half of the single-process global batch, and each resumes exactly."""
  cfg = data_config(train_files=shakespeare, seq_len=128).data
  corpus = pipeline.build_corpus(cfg, tok)
  reads = {0: set(), 1: set()}

  def spy(p):
    """The corpus with its records wrapped to log which ones process p reads."""
    base = corpus.train.sources[0].train

    class Logged:
      def __len__(self):
        return len(base)

      def __getitem__(self, i):
        reads[p].add(int(i))
        return base[i]

    source = pipeline.Source(corpus.train.sources[0].spec, Logged(), corpus.train.sources[0].eval,
                             corpus.train.sources[0].encoder)
    return pipeline.TrainData([source], corpus.train.mixture, cfg.seq_len, tok.pad_id, cfg.seed, 0)

  whole = pipeline.BatchIterator(corpus.train, 8, 0)
  shares = [pipeline.BatchIterator(spy(p), 8, 0, process_index=p, process_count=2) for p in (0, 1)]
  for _ in range(6):
    glob = next(whole)
    halves = [next(s) for s in shares]
    for k in glob:
      np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), glob[k])
  assert reads[0] and reads[1] and not reads[0] & reads[1]
  # Each process resumes its own share exactly...
  for p in (0, 1):
    _resume_check(lambda p=p: pipeline.BatchIterator(corpus.train, 8, 0, process_index=p, process_count=2))
  # ...and the states of both, merged as get_state gathers them, restore one process's run.
  states = [s.local_state() for s in shares]
  merged = {**states[0], 'lanes': {**states[0]['lanes'], **states[1]['lanes']}}
  want = next(whole)
  single = pipeline.BatchIterator(corpus.train, 8, 0)
  single.set_state(json.loads(json.dumps(merged)))
  _same(next(single), want)
  with pytest.raises(DataError, match='lacks rows'):
    pipeline.BatchIterator(corpus.train, 8, 0).set_state(states[0])


def test_state_mismatches_are_clear(tok, shakespeare):
  corpus = pipeline.build_corpus(data_config(train_files=shakespeare, seq_len=64).data, tok)
  state = pipeline.BatchIterator(corpus.train, 4, 0).get_state()
  with pytest.raises(DataError, match='batch_size=4, not 8'):
    pipeline.BatchIterator(corpus.train, 8, 0).set_state(state)
  with pytest.raises(DataError, match='older data pipeline'):
    pipeline.BatchIterator(corpus.train, 4, 0).set_state({'position': 3})
  with pytest.raises(DataError, match='not divisible by 3 processes'):
    pipeline.BatchIterator(corpus.train, 4, 0, process_count=3)


def test_seeds_shuffle_differently_and_epochs_reshuffle(tok, tmp_path):
  path = tmp_path / 'lines.txt'
  path.write_text('\n'.join(f'line number {i}' for i in range(40)))
  cfg = data_config(train_files=str(path), text_split='line', seq_len=16, packing='none')
  corpus = pipeline.build_corpus(cfg.data, tok)
  n = len(corpus.train.sources[0].train)

  def firsts(seed, batches):
    it = pipeline.BatchIterator(corpus.train, 2, seed)
    return [tuple(row) for _ in range(batches) for row in next(it)['tokens'][:, :8].tolist()]

  epoch = firsts(0, n // 2)
  assert len(set(epoch)) == n  # one epoch sees every record once
  assert firsts(0, n) [:n] == epoch and firsts(0, n)[n:] != epoch  # the next epoch reshuffles
  assert firsts(1, n // 2) != epoch


def test_empty_dataset_after_filtering(tok, tmp_path):
  path = tmp_path / 'd.jsonl'
  path.write_text(''.join(json.dumps({'instruction': 'q', 'input': '', 'output': ''}) + '\n' for _ in range(30)))
  with pytest.raises(DataError, match='no usable records.*30 empty instruction or output'):
    pipeline.build_corpus(data_config(train_files=str(path), format='alpaca').data, tok)
  long = tmp_path / 'long.jsonl'
  long.write_text(''.join(json.dumps({'instruction': 'q', 'input': '', 'output': 'word ' * 200}) + '\n'
                          for _ in range(30)))
  with pytest.raises(DataError, match='answers longer than seq_len.*empty after filtering'):
    pipeline.build_corpus(data_config(train_files=str(long), format='alpaca', seq_len=64).data, tok)
  blank = tmp_path / 'blank.txt'
  blank.write_text('\n\n   \n\n')
  with pytest.raises(DataError, match='no usable records'):
    pipeline.build_corpus(data_config(train_files=str(blank)).data, tok)


def test_config_plumbing_errors():
  with pytest.raises(ConfigError, match='no training data'):
    pipeline.source_specs(data_config().data)
  with pytest.raises(ConfigError, match='not both'):
    pipeline.source_specs(data_config(train_files='a', mixture=({'train_files': 'b'},)).data)
  with pytest.raises(ConfigError, match="unknown keys \\['wieght'\\]"):
    pipeline.source_specs(data_config(mixture=({'train_files': 'b', 'wieght': 1},)).data)
  with pytest.raises(ConfigError, match='packing'):
    pipeline.source_specs(data_config(train_files='a', packing='tight').data)
  with pytest.raises(DataError, match='data.format'):
    pipeline.build_corpus(data_config(train_files=WIKI, format='json').data, None)


def test_trained_tokenizer_for_chat_data_gets_the_template_markers(tmp_path):
  path = slice_json(ALPACA, tmp_path / 'a.json', 300)
  cfg = data_config(train_files=path, format='alpaca', chat_template='chatml', tokenizer_vocab_size=600)
  tok = pipeline.load_tokenizer(cfg.data, str(tmp_path / 'run'))
  assert tok.token_to_id('<|im_end|>') is not None and tok.token_to_id('<|im_start|>') is not None
  assert pipeline.load_tokenizer(cfg.data, str(tmp_path / 'run')).path == tok.path  # kept, reused
  corpus = pipeline.build_corpus(cfg.data, tok)
  batch = next(pipeline.BatchIterator(corpus.train, 2, 0))
  im_end = tok.token_to_id('<|im_end|>')
  for _, ids, trained in segments(batch):  # each reply is trained through its end marker
    assert ids[trained][-1] == im_end and np.count_nonzero(ids[trained] == im_end) == 1
