import numpy as np

from lm.data import packing
from lm.data.pipeline import BatchIterator


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
