"""Streamed sources in the batch pipeline: a reader per source and process, lanes fed on demand,
a held-out set, and exact resume.

A streamed source (sources.Stream) has no length and no random access, so its lanes cannot read
records r, r+B, ... as a file's lanes do. Instead each process reads its own share of the stream
(the hosts split it with datasets' split_dataset_by_node), shuffled by datasets' buffer shuffle
from the run's seed and reshuffled every epoch (set_epoch), and hands each record to the lane that
asks for the next one. Lanes ask in a fixed order (row by row, batch by batch), so which record
reaches which lane depends only on the data, the seed and the number of processes.

A record's position is (epoch, offset): offset counts the records this process's stream yielded
in that epoch. A lane remembers the positions of the records its packer may read again (the one
it stands in and those in its open rows); the data state in a checkpoint holds them and how far
the reader got. On resume the reader starts again at the oldest of them (reading the epoch up to
there and dropping it: for a Hub dataset, downloading it again), takes back the records the lanes
name, and stops where it stood, so the batches that follow are the ones an uninterrupted run
gets.
"""

from __future__ import annotations

import collections
import hashlib
import heapq
import json

from lm.errors import DataError

KEEP = 64  # recent encoded records a lane keeps: more than a packer ever reads back
MAX_EMPTY = 10_000  # records in a row that give no example before a streamed source is called empty
HOLD_OUT_SCAN = 100_000  # records read at most, at startup, to find the held-out ones


def record_hash(record: dict, seed: int) -> int:
  """A 64-bit hash of the record's content and the seed: the held-out choice, the same on every
  host and in every epoch whatever the order."""
  text = json.dumps(record, sort_keys=True, default=str, ensure_ascii=False)
  return int.from_bytes(hashlib.blake2b(f'{seed}|{text}'.encode('utf-8', 'surrogatepass'),
                                        digest_size=8).digest(), 'little')


def hold_out(stream, fraction: float, max_examples: int, seed: int):
  """(held-out records, keep) for a stream without eval files. Records whose hash falls under
  `fraction` of the range are held out (never trained on); evaluation takes the first
  `max_examples` of them, or those among the first HOLD_OUT_SCAN records (reading about
  max_examples / fraction records: 40,000 by default). A stream that ends before either has a
  known size n and holds out round(n * fraction) records (at least 1), as a file source does."""
  threshold = int(fraction * 2**64)
  smallest = []  # a heap of the max_examples smallest hashes (negated), with their records
  n = below = 0
  for n, record in enumerate(stream.iterate(), 1):
    h = record_hash(record, seed)
    below += h < threshold
    item = (-h, -n, record)
    if len(smallest) < max_examples:
      heapq.heappush(smallest, item)
    elif h < -smallest[0][0]:
      heapq.heapreplace(smallest, item)
    if below >= max_examples or n >= HOLD_OUT_SCAN:  # the heap holds all those under the threshold
      break
  else:  # the whole stream was read: hold out as many as a file of n records would
    n_eval = min(max(1, int(round(n * fraction))), max_examples)
    if n_eval >= n:
      raise DataError(f'{stream.name}: {n} records are too few to hold out {n_eval} for evaluation; '
                      'add data or set data.eval_files')
    ranked = sorted(smallest, key=lambda x: (-x[0], -x[1]))
    threshold = -ranked[n_eval - 1][0] + 1
  held = sorted((x for x in smallest if -x[0] < threshold), key=lambda x: -x[1])
  return [x[2] for x in held], lambda record: record_hash(record, seed) >= threshold


class Reader:
  """This process's share of one streamed source, epoch after epoch; `next()` gives the next
  training record (held-out ones are read past) and its position."""

  def __init__(self, stream, *, seed: int, shuffle_buffer: int, process_index: int = 0,
               process_count: int = 1, keep=None):
    self.stream, self.keep = stream, keep
    self.options = dict(seed=seed, shuffle_buffer=shuffle_buffer, process_index=process_index,
                        process_count=process_count)
    self.epoch = self.offset = 0
    self._records = None

  @property
  def position(self) -> tuple[int, int]:
    return self.epoch, self.offset

  def seek(self, position) -> None:
    self.epoch, self.offset = int(position[0]), int(position[1])
    self._records = None

  def next_raw(self):
    """(position, record) of the next record of the stream, held out or not."""
    while True:
      if self._records is None:
        self._records = self.stream.iterate(self.epoch, self.offset, **self.options)
      record = next(self._records, None)
      if record is not None:
        position = self.position
        self.offset += 1
        return position, record
      if self.offset == 0:
        raise DataError(f'{self.stream.name}: the stream is empty (on process '
                        f'{self.options["process_index"]} of {self.options["process_count"]}); '
                        'check the data')
      self.seek((self.epoch + 1, 0))

  def next(self):
    start = self.epoch
    while True:
      position, record = self.next_raw()
      if self.keep is None or self.keep(record):
        return position, record
      if self.epoch > start + 1:  # a whole epoch read without a training record
        raise DataError(f'{self.stream.name}: every record this process reads is held out for '
                        'evaluation; add data, lower data.eval_fraction or set data.eval_files')

  def advance_to(self, position) -> None:
    """Reads on to `position` (at or after where the reader stands)."""
    position = (int(position[0]), int(position[1]))
    if self.position > position:
      raise DataError(f'{self.stream.name}: the data state is past its own stream position; the '
                      'checkpoint is damaged: resume from an earlier one')
    if self.position[0] < position[0]:
      self.seek(position)  # the rest of this epoch need not be read
    while self.position < position:
      self.next_raw()

  def get_state(self) -> dict:
    return {'epoch': self.epoch, 'offset': self.offset}


class Lane:
  """A packer's view of one lane of a streamed source: lane[j] is the encoded j-th record the
  lane took from the shared reader, taken when first asked for."""

  def __init__(self, reader: Reader, encoder):
    self.reader, self.encoder = reader, encoder
    self.taken = 0
    self.positions = {}  # j -> position: the records the packer may read again, and recent ones
    self._cache = collections.OrderedDict()  # j -> encoded record, the most recent

  def __getitem__(self, j: int):
    j = int(j)
    if j in self._cache:
      return self._cache[j]
    if j < self.taken:
      raise RuntimeError(f'lane record {j} of {self.reader.stream.name} is no longer held (the '
                         f'lane has taken {self.taken})')
    while self.taken <= j:
      position, record = self.reader.next()
      self.put(self.taken, position, record)
      self.taken += 1
    return self._cache[j]

  def put(self, j: int, position, record) -> None:
    self.positions[j] = tuple(position)
    self._cache[j] = self.encoder(record)
    while len(self._cache) > KEEP:
      self._cache.popitem(last=False)

  def get_state(self, referenced) -> dict:
    """The lane's state; forgets the positions of records before the last KEEP that the packer
    no longer names (`referenced`: the lane records its state names)."""
    referenced = {int(j) for j in referenced if j < self.taken}
    for j in [j for j in self.positions if j not in referenced and j < self.taken - KEEP]:
      del self.positions[j]
    return {'taken': self.taken, 'records': {str(j): list(self.positions[j]) for j in sorted(referenced)}}

  def reset(self, taken: int) -> None:
    self.taken = int(taken)
    self.positions.clear()
    self._cache.clear()


def restore(reader: Reader, lanes: list[Lane], lane_states: list[dict], reader_state: dict) -> None:
  """Puts the reader and `lanes` back where `reader_state` and `lane_states` say: the records the
  lanes name are read again, and the reader stands where it stood."""
  wanted = collections.defaultdict(list)
  for lane, state in zip(lanes, lane_states):
    lane.reset(state['taken'])
    for j, position in state['records'].items():
      wanted[(int(position[0]), int(position[1]))].append((lane, int(j)))
  stop = (int(reader_state['epoch']), int(reader_state['offset']))
  reader.seek(min(wanted, default=stop))
  while wanted and reader.position < stop:
    position, record = reader.next_raw()
    for lane, j in wanted.pop(position, ()):
      lane.put(j, position, record)
  if wanted:
    missing = min(wanted)
    raise DataError(f'{reader.stream.name}: the stream no longer holds record {missing[1]} of epoch '
                    f'{missing[0]} that the checkpoint names; the data changed since: resume with the '
                    'same data (and number of processes), or start a new --workdir')
  reader.advance_to(stop)
