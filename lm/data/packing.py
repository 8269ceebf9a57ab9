"""Packing token items into fixed-length rows with segment ids and positions.

The batch format every objective consumes: tokens, targets, weights, segment_ids, positions, all
[rows, seq_len] (preference rows: the same keys prefixed chosen_ and rejected_). Segments never
attend to each other, positions restart at 0 for each, and weights are 0 on padding, on targets
that belong to another segment, and on tokens the item's mask leaves untrained.

Packers read items from a random-access lane (`lane[j] -> (items, note)`, usually a grain
MapDataset) and keep their position as a few integers, so `get_state()` is small JSON and
`set_state()` resumes exactly by re-reading the items it names.

  StreamPacker  concatenates items and cuts rows that overlap by one token, so every token except
                a document's last is a target; a document running over a row boundary continues
                in the next row as a new segment (pretraining text: ~100% of positions used)
  BinPacker     whole items only, first-fit into a few open rows (SFT: an example is never split);
                `per_row=1` puts one item per row; `pairs=True` lays out chosen/rejected pairs
                identically in two rows
  RowPacker     rows that are already packed
"""

from __future__ import annotations

import collections

import numpy as np

from lm.errors import DataError

BATCH_KEYS = ('tokens', 'targets', 'weights', 'segment_ids', 'positions')
DTYPES = {'tokens': np.int32, 'targets': np.int32, 'weights': np.float32, 'segment_ids': np.int32,
          'positions': np.int32}
OPEN_ROWS = 8  # rows a BinPacker fills at once: more packs tighter, each costs a re-read on resume


def pack_documents(docs_ids: list[list[int]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Token-id documents -> packed rows (stream packing, all tokens trained). The last row is
  padded (segment id 0, weight 0)."""
  lengths = np.fromiter((len(d) for d in docs_ids), dtype=np.int64, count=len(docs_ids))
  stream = np.fromiter((t for d in docs_ids for t in d), dtype=np.int32, count=int(lengths.sum()))
  doc_of = np.repeat(np.arange(1, len(docs_ids) + 1, dtype=np.int32), lengths)
  n_rows = max(1, -(-(len(stream) - 1) // seq_len))
  total = n_rows * seq_len + 1
  stream = np.concatenate([stream, np.full(total - len(stream), pad_id, np.int32)])
  doc_of = np.concatenate([doc_of, np.zeros(total - len(doc_of), np.int32)])
  index = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  return _rows_from_stream(stream[index], doc_of[index], np.ones_like(stream[index], bool))


def _rows_from_stream(tok_BT1, doc_BT1, mask_BT1) -> dict[str, np.ndarray]:
  """Rows of seq_len + 1 tokens (with their document numbers, 0 = padding) -> batch arrays."""
  tokens, targets = tok_BT1[:, :-1], tok_BT1[:, 1:]
  docs_in, docs_out = doc_BT1[:, :-1], doc_BT1[:, 1:]
  weights = ((docs_in == docs_out) & (docs_in != 0) & mask_BT1[:, 1:]).astype(np.float32)
  segment_ids = _renumber(docs_in)
  return {'tokens': tokens.astype(np.int32), 'targets': targets.astype(np.int32), 'weights': weights,
          'segment_ids': segment_ids, 'positions': _positions(segment_ids)}


def _renumber(docs_BT: np.ndarray) -> np.ndarray:
  """Document ids -> 1, 2, ... within each row (0 stays padding)."""
  starts = np.concatenate([np.ones_like(docs_BT[:, :1], bool), docs_BT[:, 1:] != docs_BT[:, :-1]], 1)
  seg = np.cumsum(starts, axis=1).astype(np.int32)
  return np.where(docs_BT == 0, 0, seg)


def _positions(segment_ids_BT: np.ndarray) -> np.ndarray:
  """0, 1, 2, ... restarting at each segment start."""
  B, T = segment_ids_BT.shape
  idx = np.broadcast_to(np.arange(T), (B, T))
  starts = np.concatenate([np.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1)
  start_idx = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
  return (idx - start_idx).astype(np.int32)


def packing_efficiency(rows: dict[str, np.ndarray]) -> float:
  """Share of positions holding real (non-padding) tokens."""
  seg = rows['segment_ids'] if 'segment_ids' in rows else rows['chosen_segment_ids']
  return float(np.mean(seg != 0))


def empty_rows(n: int, seq_len: int, pad_id: int, prefix: str = '') -> dict[str, np.ndarray]:
  rows = {prefix + k: np.zeros((n, seq_len), DTYPES[k]) for k in BATCH_KEYS}
  rows[prefix + 'tokens'][:] = pad_id
  rows[prefix + 'targets'][:] = pad_id
  return rows


class _Packer:
  """Shared bookkeeping: reading a lane, counting what was skipped, noticing an empty source."""

  def __init__(self, lane, seq_len: int, pad_id: int, *, max_empty: int, finite: bool = False):
    self.lane, self.seq_len, self.pad_id = lane, seq_len, pad_id
    self.max_empty, self.finite = max_empty, finite
    self.counts = collections.Counter()  # notes: skip reasons, 'truncated'; and 'tokens'
    self._cache = collections.OrderedDict()

  def _items(self, j: int, *, count: bool = True):
    """Items of lane record j (cached); counts its note the first time it is read forward."""
    if j in self._cache:
      return self._cache[j]
    items, note = self.lane[j]
    if note and count:
      self.counts[note] += 1
    self._cache[j] = items
    while len(self._cache) > 4 * OPEN_ROWS + 4:
      self._cache.popitem(last=False)
    return items

  def _next_nonempty(self, j: int) -> int | None:
    """First lane record at or after j with items; None at the end of a finite lane."""
    for k in range(j, j + self.max_empty):
      if self.finite and k >= len(self.lane):
        return None
      if self._items(k):
        return k
    reasons = ', '.join(f'{n} {r}' for r, n in self.counts.items() if r not in ('tokens', 'truncated'))
    raise DataError(f'{self.max_empty} records in a row gave no usable example ({reasons or "none"}); '
                    'the data is empty after filtering: check data.format, data.fields and '
                    'data.seq_len')

  def _base_state(self):
    return {'counts': dict(self.counts)}

  def _set_base_state(self, state):
    self.counts = collections.Counter(state.get('counts', {}))
    self._cache.clear()


class StreamPacker(_Packer):
  """Items concatenated, rows of seq_len + 1 tokens overlapping by one."""

  def __init__(self, lane, seq_len, pad_id, **kw):
    super().__init__(lane, seq_len, pad_id, **kw)
    self.pos = (0, 0)  # (lane record, token offset) where the next row starts
    self.done = False

  def next_row(self) -> dict[str, np.ndarray] | None:
    if self.done:
      return None
    need = self.seq_len + 1
    toks, docs, masks = [], [], []
    j, o = self.pos
    next_pos = None
    doc = 0
    while need > 0:
      k = self._next_nonempty(j)
      if k is None:  # finite lane exhausted: pad the last row
        if not toks or (sum(map(len, toks)) <= 1):
          self.done = True
          return None
        self.done = True
        break
      if k != j:
        j, o = k, 0
      ids, mask = self._items(j)[0]
      doc += 1
      take = min(need, len(ids) - o)
      got = self.seq_len + 1 - need  # tokens collected before this piece
      if next_pos is None and got + take > self.seq_len:
        next_pos = (j, o + self.seq_len - got)  # the token at position seq_len starts the next row
      toks.append(ids[o:o + take])
      masks.append(mask[o:o + take])
      docs.append(np.full(take, doc, np.int32))
      need -= take
      if o + take >= len(ids):
        j, o = j + 1, 0
      else:
        o += take
    if next_pos is None:
      next_pos = (j, o)
    self.pos = next_pos
    tok, dc, mk = np.concatenate(toks), np.concatenate(docs), np.concatenate(masks)
    if len(tok) < self.seq_len + 1:
      pad = self.seq_len + 1 - len(tok)
      tok = np.concatenate([tok, np.full(pad, self.pad_id, np.int32)])
      dc = np.concatenate([dc, np.zeros(pad, np.int32)])
      mk = np.concatenate([mk, np.zeros(pad, bool)])
    row = {k: v[0] for k, v in _rows_from_stream(tok[None], dc[None], mk[None]).items()}
    self.counts['tokens'] += int(np.count_nonzero(row['segment_ids']))
    return row

  def get_state(self):
    return {**self._base_state(), 'pos': [int(self.pos[0]), int(self.pos[1])], 'done': self.done}

  def referenced(self) -> set[int]:
    """The lane records `set_state` reads again."""
    return {int(self.pos[0])}

  def set_state(self, state):
    self._set_base_state(state)
    self.pos = (int(state['pos'][0]), int(state['pos'][1]))
    self.done = bool(state.get('done', False))


class BinPacker(_Packer):
  """Whole items, first-fit into OPEN_ROWS open rows; the fullest row is emitted when an item fits
  nowhere. An item of n tokens takes n - 1 positions."""

  def __init__(self, lane, seq_len, pad_id, *, per_row: int = 0, pairs: bool = False, **kw):
    super().__init__(lane, seq_len, pad_id, **kw)
    self.per_row, self.pairs = per_row, pairs
    self.open_rows = 1 if per_row == 1 else OPEN_ROWS
    self.pos = [0, 0]  # (lane record, item within it) to read next
    self.bins = []  # open rows: lists of (record, item) references
    self._held = {}  # reference -> item, for items in open rows
    self.done = False

  def _size(self, item):
    if self.pairs:
      return max(len(item[0][0]), len(item[1][0])) - 1
    return len(item[0]) - 1

  def _used(self, b):
    return sum(self._size(self._held[r]) for r in b)

  def _advance(self):
    """The next item reference, or None at the end of a finite lane."""
    j, i = self.pos
    if i > 0 and i >= len(self._items(j, count=False)):  # record j was counted when first read
      j, i = j + 1, 0
    if i == 0:
      j = self._next_nonempty(j)
      if j is None:
        return None
    self.pos = [j, i + 1]
    return (j, i)

  def next_row(self):
    while not self.done:
      ref = self._advance()
      if ref is None:
        self.done = True
        break
      item = self._items(ref[0])[ref[1]]
      size = self._size(item)
      if size < 1:
        continue
      if size > self.seq_len:
        raise DataError(f'an item of {size + 1} tokens reached packing; it should have been '
                        'truncated to data.seq_len + 1')
      self._held[ref] = item
      for b in self.bins:
        if self._used(b) + size <= self.seq_len and (not self.per_row or len(b) < self.per_row):
          b.append(ref)
          break
      else:
        if len(self.bins) < self.open_rows:
          self.bins.append([ref])
          if self.per_row == 1:
            return self._emit(self.bins.pop())
          continue
        fullest = max(range(len(self.bins)), key=lambda i: self._used(self.bins[i]))
        row = self.bins[fullest]
        self.bins[fullest] = [ref]
        return self._emit(row)
    if self.bins:  # finite lane exhausted: flush the fullest open row
      fullest = max(range(len(self.bins)), key=lambda i: self._used(self.bins[i]))
      return self._emit(self.bins.pop(fullest))
    return None

  def _emit(self, refs):
    items = [self._held.pop(r) for r in refs]
    widths = [self._size(it) for it in items]
    if self.pairs:
      row = {**_fill([it[0] for it in items], widths, self.seq_len, self.pad_id, 'chosen_'),
             **_fill([it[1] for it in items], widths, self.seq_len, self.pad_id, 'rejected_')}
      self.counts['tokens'] += int(np.count_nonzero(row['chosen_segment_ids'])
                                   + np.count_nonzero(row['rejected_segment_ids']))
    else:
      row = _fill(items, widths, self.seq_len, self.pad_id, '')
      self.counts['tokens'] += int(np.count_nonzero(row['segment_ids']))
    return row

  def get_state(self):
    return {**self._base_state(), 'pos': [int(p) for p in self.pos],
            'bins': [[[int(r[0]), int(r[1])] for r in b] for b in self.bins], 'done': self.done}

  def referenced(self) -> set[int]:
    """The lane records `set_state` (and the next `_advance`) read again."""
    return {int(self.pos[0])} | {int(r[0]) for b in self.bins for r in b}

  def set_state(self, state):
    self._set_base_state(state)
    self.pos = [int(p) for p in state['pos']]
    self.bins = [[(int(r[0]), int(r[1])) for r in b] for b in state['bins']]
    self._held = {r: self._items(r[0], count=False)[r[1]] for b in self.bins for r in b}
    self.done = bool(state.get('done', False))


def _fill(items, widths, seq_len, pad_id, prefix):
  """One row from items laid out one after another; item k is segment k + 1."""
  row = {k: v[0] for k, v in empty_rows(1, seq_len, pad_id).items()}
  off = 0
  for k, ((ids, mask), width) in enumerate(zip(items, widths), 1):
    n = len(ids) - 1
    row['tokens'][off:off + n] = ids[:-1]
    row['targets'][off:off + n] = ids[1:]
    row['weights'][off:off + n] = mask[1:]
    row['segment_ids'][off:off + n] = k
    row['positions'][off:off + n] = np.arange(n)
    off += width
  return {prefix + k: v for k, v in row.items()}


class RowPacker(_Packer):
  """Already packed rows: lane[j] is a row dict."""

  def __init__(self, lane, seq_len, pad_id, **kw):
    super().__init__(lane, seq_len, pad_id, **kw)
    self.pos = 0

  def next_row(self):
    if self.finite and self.pos >= len(self.lane):
      return None
    row = self.lane[self.pos]
    self.pos += 1
    self.counts['tokens'] += int(np.count_nonzero(row.get('segment_ids', row.get('chosen_segment_ids'))))
    return row

  def get_state(self):
    return {**self._base_state(), 'pos': self.pos}

  def set_state(self, state):
    self._set_base_state(state)
    self.pos = int(state['pos'])


def pack_all(packer) -> dict[str, np.ndarray] | None:
  """Every row of a finite packer, stacked; None if it yields none."""
  rows = []
  while (row := packer.next_row()) is not None:
    rows.append(row)
  if not rows:
    return None
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
