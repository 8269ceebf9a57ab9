"""From config to batches: documents -> tokenizer -> packed rows -> a resumable batch iterator."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from lm.data import packing, sources
from lm.data.tokenizer import Tokenizer, train_tokenizer
from lm.errors import DataError


def load_tokenizer(data_cfg, workdir: str) -> Tokenizer:
  """The configured tokenizer, or one trained on the training corpus and kept in the workdir."""
  if data_cfg.tokenizer:
    return Tokenizer(data_cfg.tokenizer)
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.isfile(path):
    return Tokenizer(path)
  docs = sources.read_documents(data_cfg.train_files, data_cfg.text_field)
  return train_tokenizer(docs, path, data_cfg.tokenizer_vocab_size, data_cfg.tokenizer_model_type,
                         seed=data_cfg.seed)


@dataclasses.dataclass
class Corpus:
  train: dict  # packed rows
  eval: dict
  unigram_log_probs: np.ndarray  # [V] add-one smoothed, from training tokens


def build_corpus(data_cfg, tokenizer: Tokenizer) -> Corpus:
  docs = sources.read_documents(data_cfg.train_files, data_cfg.text_field)
  if data_cfg.eval_files:
    eval_docs = sources.read_documents(data_cfg.eval_files, data_cfg.text_field)
  else:
    order = np.random.default_rng(data_cfg.seed).permutation(len(docs))
    n_eval = max(1, int(round(len(docs) * data_cfg.eval_fraction)))
    if n_eval >= len(docs):
      raise DataError(f'{len(docs)} documents are too few to hold out {n_eval} for evaluation; '
                      'add data or set data.eval_files')
    eval_docs = [docs[i] for i in order[:n_eval]]
    docs = [docs[i] for i in sorted(order[n_eval:])]

  def encode(ds):
    return [[tokenizer.bos_id] + ids + [tokenizer.eos_id] for ids in tokenizer.encode_batch(ds)]

  train_ids, eval_ids = encode(docs), encode(eval_docs)
  counts = np.bincount(np.concatenate([np.asarray(d, np.int64) for d in train_ids]),
                       minlength=tokenizer.vocab_size).astype(np.float64) + 1.0
  return Corpus(train=packing.pack_documents(train_ids, data_cfg.seq_len, tokenizer.pad_id),
                eval=packing.pack_documents(eval_ids, data_cfg.seq_len, tokenizer.pad_id),
                unigram_log_probs=np.log(counts / counts.sum()))


def unigram_perplexity(corpus: Corpus) -> float:
  """Perplexity of the training-set unigram distribution on the held-out targets: the baseline
  any model that learned something beyond token frequencies must beat."""
  w = corpus.eval['weights']
  nll = -corpus.unigram_log_probs[corpus.eval['targets']]
  return float(math.exp(np.sum(nll * w) / np.sum(w)))


class BatchIterator:
  """Shuffled batches of packed rows, epoch after epoch; state is one integer, so resuming from
  a checkpoint replays exactly the batches an uninterrupted run would have seen.

  Each process yields only its own share of the global batch (rows
  [process_index * B/P, (process_index + 1) * B/P) of every global batch).
  """

  def __init__(self, rows: dict, global_batch: int, seed: int, *, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1):
    self.rows = rows
    self.n = len(rows['tokens'])
    if self.n < global_batch:
      raise DataError(f'only {self.n} packed sequences but data.batch_size={global_batch}; '
                      'add data, shorten data.seq_len, or lower data.batch_size')
    if global_batch % process_count:
      raise DataError(f'data.batch_size={global_batch} is not divisible by {process_count} processes')
    self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.batches_per_epoch = self.n // global_batch
    self.position = 0  # batches yielded so far
    self._cached_epoch, self._cached_order = None, None

  def _order(self, epoch: int) -> np.ndarray:
    if epoch != self._cached_epoch:
      self._cached_epoch = epoch
      self._cached_order = (np.random.default_rng([self.seed, epoch]).permutation(self.n)
                            if self.shuffle else np.arange(self.n))
    return self._cached_order

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    epoch, i = divmod(self.position, self.batches_per_epoch)
    start = i * self.global_batch + self.offset
    idx = np.sort(self._order(epoch)[start:start + self.local])
    self.position += 1
    return {k: v[idx] for k, v in self.rows.items()}

  def get_state(self) -> dict:
    return {'position': self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state['position'])
