"""Packers: stream and bin packing invariants, exact resume from their JSON state, efficiency."""

import json

import numpy as np
import pytest
from data_util import LLAMA2, SHAKESPEARE, data_config, needs_shared

from lm.data import packing, pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.data.pipeline import BatchIterator
from lm.data.show import segments
from lm.errors import DataError


class Lane:
  """A finite lane of documents 100*j + 0, 1, 2, ... (len varies), every token trained."""

  def __init__(self, lengths, answer_from=None):
    self.lengths, self.answer_from = lengths, answer_from

  def __len__(self):
    return len(self.lengths)

  def __getitem__(self, j):
    n = self.lengths[j]
    if n == 0:
      return [], 'empty documents'
    ids = np.arange(n, dtype=np.int32) + 1000 * (j + 1)
    mask = np.ones(n, bool) if self.answer_from is None else np.arange(n) >= self.answer_from
    mask[0] = False
    return [(ids, mask)], None


def _collect(packer):
  rows = []
  while (row := packer.next_row()) is not None:
    rows.append(row)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def test_stream_packing_trains_every_next_token_pair_once():
  lengths = [5, 1, 0, 17, 3, 40, 2, 9]
  rows = _collect(packing.StreamPacker(Lane(lengths), 8, 0, max_empty=10, finite=True))
  pairs = {(int(a), int(b)) for a, b, w in zip(rows['tokens'].ravel(), rows['targets'].ravel(),
                                              rows['weights'].ravel()) if w}
  expected = {(1000 * (j + 1) + i, 1000 * (j + 1) + i + 1) for j, n in enumerate(lengths) for i in range(n - 1)}
  assert pairs == expected and rows['weights'].sum() == len(expected)
  for r in range(len(rows['tokens'])):  # positions restart at each segment
    for s in np.unique(rows['segment_ids'][r][rows['segment_ids'][r] > 0]):
      np.testing.assert_array_equal(rows['positions'][r][rows['segment_ids'][r] == s],
                                    np.arange(np.sum(rows['segment_ids'][r] == s)))


def test_stream_packer_matches_pack_documents():
  lengths = [5, 7, 3, 12, 30]
  lane = Lane(lengths)
  rows = _collect(packing.StreamPacker(lane, 8, 0, max_empty=10, finite=True))
  reference = packing.pack_documents([lane[j][0][0][0].tolist() for j in range(len(lengths))], 8)
  for k in packing.BATCH_KEYS:
    np.testing.assert_array_equal(rows[k], reference[k])
    assert rows[k].dtype == reference[k].dtype == packing.DTYPES[k]


def test_bin_packing_keeps_examples_whole_and_masks():
  lengths = [5, 9, 3, 12, 4, 4, 8, 2, 6, 7, 11, 3]
  lane = Lane(lengths, answer_from=2)
  rows = _collect(packing.BinPacker(lane, 16, 0, max_empty=10, finite=True))
  seen = []
  for _, ids, trained in segments(rows):
    j = ids[0] // 1000 - 1
    np.testing.assert_array_equal(ids, lane[j][0][0][0])  # whole, in order
    np.testing.assert_array_equal(trained, lane[j][0][0][1])
    seen.append(j)
  assert sorted(seen) == list(range(len(lengths)))
  one = _collect(packing.BinPacker(lane, 16, 0, per_row=1, max_empty=10, finite=True))
  assert one['segment_ids'].max() == 1 and len(one['tokens']) == len(lengths)


@pytest.mark.parametrize('kind', ['stream', 'bin'])
def test_packers_resume_exactly_from_json_state(kind):
  rng = np.random.default_rng(0)
  lengths = rng.integers(0, 25, 200).tolist()

  def make():
    cls = packing.StreamPacker if kind == 'stream' else packing.BinPacker
    return cls(Lane(lengths, answer_from=None if kind == 'stream' else 3), 24, 0, max_empty=50, finite=True)

  packer = make()
  for _ in range(7):
    packer.next_row()
  state = json.loads(json.dumps(packer.get_state()))
  expected = [packer.next_row() for _ in range(10)]
  resumed = make()
  resumed.set_state(state)
  for row in expected:
    got = resumed.next_row()
    for k in row:
      np.testing.assert_array_equal(got[k], row[k])
  assert resumed.counts == packer.counts


def test_a_lane_with_nothing_usable_is_a_clear_error():
  packer = packing.StreamPacker(Lane([0] * 50), 8, 0, max_empty=20)
  with pytest.raises(DataError, match='empty after filtering'):
    packer.next_row()


@needs_shared
def test_packing_efficiency_on_tinyshakespeare_at_512():
  tok = tokenizer_lib.load(LLAMA2)
  cfg = data_config(train_files=SHAKESPEARE, seq_len=512, batch_size=8)
  corpus = pipeline.build_corpus(cfg.data, tok)
  assert corpus.sample_efficiency > 0.9 and 'packing efficiency' in corpus.describe()
  it = pipeline.BatchIterator(corpus.train, 8, 0)
  batches = [next(it) for _ in range(8)]
  efficiency = packing.packing_efficiency({'segment_ids': np.concatenate([b['segment_ids'] for b in batches])})
  print(f'tinyshakespeare packing efficiency at seq 512: {efficiency:.2%} '
        f'(sample estimate {corpus.sample_efficiency:.2%})')
  assert efficiency > 0.9


def test_packing_sets_segments_positions_and_weights():
  docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33]]
  rows = packing.pack_documents(docs, seq_len=4, pad_id=0)
  # stream 10 11 12 20 21 30 31 32 33: row r covers stream[4r : 4r + 5] (rows overlap by one token)
  np.testing.assert_array_equal(rows['tokens'], [[10, 11, 12, 20], [21, 30, 31, 32]])
  np.testing.assert_array_equal(rows['targets'], [[11, 12, 20, 21], [30, 31, 32, 33]])
  np.testing.assert_array_equal(rows['segment_ids'], [[1, 1, 1, 2], [1, 2, 2, 2]])
  np.testing.assert_array_equal(rows['positions'], [[0, 1, 2, 0], [0, 0, 1, 2]])
  # No target crosses a document boundary.
  np.testing.assert_array_equal(rows['weights'], [[1, 1, 0, 1], [0, 1, 1, 1]])
  padded = packing.pack_documents(docs[:2] + [[40]], seq_len=4)  # 6 tokens: the last row pads
  np.testing.assert_array_equal(padded['tokens'], [[10, 11, 12, 20], [21, 40, 0, 0]])
  np.testing.assert_array_equal(padded['segment_ids'], [[1, 1, 1, 2], [1, 2, 0, 0]])
  np.testing.assert_array_equal(padded['weights'], [[1, 1, 0, 1], [0, 0, 0, 0]])
  # Every in-document next-token pair is trained exactly once.
  assert rows['weights'].sum() == sum(len(d) - 1 for d in docs)


def test_iterator_resumes_exactly_and_splits_processes():
  rows = packing.pack_documents([list(range(i, i + 50)) for i in range(40)], seq_len=8)
  it = BatchIterator(rows, 4, seed=3)
  seen = [next(it)['tokens'] for _ in range(17)]
  state = it.get_state()
  seen += [next(it)['tokens'] for _ in range(13)]  # crosses epoch boundaries
  resumed = BatchIterator(rows, 4, seed=3)
  resumed.set_state(state)
  for i in range(17, 30):
    np.testing.assert_array_equal(next(resumed)['tokens'], seen[i])
  halves = [BatchIterator(rows, 4, seed=3, process_index=p, process_count=2) for p in range(2)]
  for i in range(5):
    both = np.concatenate([next(h)['tokens'] for h in halves])
    assert sorted(map(tuple, both)) == sorted(map(tuple, seen[i]))
