"""Packing documents into fixed-length rows with segment ids and positions.

The batch format every objective consumes: tokens, targets, weights, segment_ids, positions, all
[rows, seq_len]. Documents are concatenated into one stream and cut into rows that overlap by one
token, so every token except a document's last has its next token as target. A document that runs
over a row boundary continues in the next row as a new segment; segments never attend to each
other, and weights are 0 where the target belongs to another document or to padding.
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ('tokens', 'targets', 'weights', 'segment_ids', 'positions')


def pack_documents(docs_ids: list[list[int]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Token-id documents -> packed rows. The last row is padded (segment id 0, weight 0)."""
  lengths = np.fromiter((len(d) for d in docs_ids), dtype=np.int64, count=len(docs_ids))
  stream = np.fromiter((t for d in docs_ids for t in d), dtype=np.int32, count=int(lengths.sum()))
  doc_of = np.repeat(np.arange(1, len(docs_ids) + 1, dtype=np.int32), lengths)
  n_rows = max(1, -(-(len(stream) - 1) // seq_len))
  total = n_rows * seq_len + 1
  stream = np.concatenate([stream, np.full(total - len(stream), pad_id, np.int32)])
  doc_of = np.concatenate([doc_of, np.zeros(total - len(doc_of), np.int32)])

  # Row r covers stream[r*L : r*L + L + 1]: inputs are its first L tokens, targets its last L.
  index = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
  row_tokens, row_docs = stream[index], doc_of[index]
  tokens, targets = row_tokens[:, :-1], row_tokens[:, 1:]
  docs_in, docs_out = row_docs[:, :-1], row_docs[:, 1:]
  weights = ((docs_in == docs_out) & (docs_in != 0)).astype(np.float32)
  segment_ids = _renumber(docs_in)
  return {'tokens': tokens, 'targets': targets, 'weights': weights,
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
  return float(np.mean(rows['segment_ids'] != 0))
