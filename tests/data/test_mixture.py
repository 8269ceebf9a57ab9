"""Mixtures: weighted, deterministic, per-source token counts, exact resume, process shares."""

import json

import numpy as np
import pytest
from data_util import ALPACA, C4, LLAMA2, data_config, needs_shared, slice_json

from lm.data import mixture, pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError


def test_every_batch_holds_the_mixture_to_within_one_row():
  mix = mixture.Mixture(['task', 'general'], [0.8, 0.2], seed=0)
  counts = np.stack([np.bincount(mix.assign(step, 16), minlength=2) for step in range(500)])
  assert set(counts[:, 0]) <= {12, 13} and (counts.sum(1) == 16).all()
  assert abs(counts[:, 0].mean() / 16 - 0.8) < 0.01
  np.testing.assert_array_equal(mix.assign(7, 16), mixture.Mixture(['a', 'b'], [4, 1], 0).assign(7, 16))
  assert any((mix.assign(s, 16) != mixture.Mixture(['a', 'b'], [0.8, 0.2], 1).assign(s, 16)).any()
             for s in range(5))
  three = mixture.Mixture(['a', 'b', 'c'], [0.5, 0.3, 0.2], 3)
  assert abs(np.mean([np.mean(three.assign(s, 10) == 2) for s in range(300)]) - 0.2) < 0.02
  with pytest.raises(ConfigError, match='weights'):
    mixture.Mixture(['a'], [0.0], 0)


@pytest.fixture(scope='module')
def mixed(tmp_path_factory):
  """80% alpaca instructions, 20% c4 web text."""
  folder = tmp_path_factory.mktemp('mix')
  cfg = data_config(seq_len=256, batch_size=8, eval_fraction=0.1, mixture=(
      {'train_files': slice_json(ALPACA, folder / 'alpaca.json', 200), 'format': 'alpaca',
       'weight': 0.8, 'name': 'task'},
      {'train_files': slice_json(C4, folder / 'c4.jsonl', 60), 'weight': 0.2, 'name': 'general'}))
  tok = tokenizer_lib.load(LLAMA2)
  return pipeline.build_corpus(cfg.data, tok), cfg


@needs_shared
def test_mixture_batches_and_per_source_token_counts(mixed):
  corpus, cfg = mixed
  assert [s.spec.name for s in corpus.train.sources] == ['task', 'general']
  assert [s.spec.pack_mode for s in corpus.train.sources] == ['whole', 'stream']
  it = pipeline.BatchIterator(corpus.train, 8, cfg.data.seed)
  rows = [next(it) for _ in range(25)]
  metrics = it.metrics()
  task, general = metrics['data/tokens_task'], metrics['data/tokens_general']
  assert 0.7 < task / (task + general) < 0.9
  # SFT rows leave prompts untrained; web-text rows train on (nearly) every position.
  assignment = [corpus.train.mixture.assign(s, 8) for s in range(25)]
  for batch, src in zip(rows, assignment):
    trained = (batch['weights'] > 0).mean(axis=1)
    assert (trained[src == 1] > 0.98).all() and (trained[src == 0] < 0.98).all()
  assert 'task' in corpus.describe() and 'weight 0.80' in corpus.describe()


@needs_shared
def test_mixture_resumes_exactly_also_per_process(mixed):
  corpus, cfg = mixed
  for p, n in ((0, 1), (0, 2), (1, 2)):
    def make(p=p, n=n):
      return pipeline.BatchIterator(corpus.train, 8, cfg.data.seed, process_index=p, process_count=n)
    it = make()
    for _ in range(9):
      next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it) for _ in range(5)]
    resumed = make()
    resumed.set_state(state)
    for batch in want:
      got = next(resumed)
      for k in batch:
        np.testing.assert_array_equal(got[k], batch[k])
  halves = [pipeline.BatchIterator(corpus.train, 8, cfg.data.seed, process_index=p, process_count=2)
            for p in (0, 1)]
  whole = pipeline.BatchIterator(corpus.train, 8, cfg.data.seed)
  for _ in range(4):
    glob, parts = next(whole), [next(h) for h in halves]
    np.testing.assert_array_equal(np.concatenate([h['tokens'] for h in parts]), glob['tokens'])
