"""From config to batches: sources -> records -> grain shuffle -> encode -> pack -> lanes -> batches.

The global batch has B rows and each row is a *lane*: lane r reads records r, r + B, r + 2B, ...
of each source's seeded, per-epoch reshuffled order (a grain MapDataset), encodes them and packs
them into its rows. A process builds only its own lanes (rows [p*B/P, (p+1)*B/P)), so it reads
only its share of the data, and the global batch is the same whatever the process count.

The iterator's state is JSON: the step and, per lane, a few integers naming where its packer
stands. It is saved inside the training checkpoint; `set_state` re-reads the handful of records
those integers name, so a resumed run sees exactly the batches it would have seen. With several
processes, `get_state` gathers every process's lanes, so one state file restores any process.

A streamed source (data.streaming: a Hub dataset by default) has no random access: each process
reads its share of the stream in order and hands records to its lanes as they ask
(lm/data/streaming.py); its state adds the stream positions of the records the lanes still name.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import grain
import numpy as np

from lm.data import chat, formats, mixture, packing, sources, streaming
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError, DataError

PACKINGS = ('auto', 'stream', 'whole', 'none')
# Keys a data.mixture entry may set; the rest come from the data section.
SOURCE_KEYS = ('train_files', 'eval_files', 'weight', 'name', 'format', 'fields', 'text_field',
               'text_split', 'tfds_data_dir', 'chat_template', 'train_on', 'truncate',
               'bad_records', 'packing', 'streaming', 'shuffle_buffer')
STREAMING = ('auto', 'true', 'false')
SAMPLE_RECORDS = 1000  # records encoded up front: unigram baseline, packing estimate, sanity check
TOKENIZER_STREAM_RECORDS = 100_000  # a streamed source trains a tokenizer on its first records
STATE_VERSION = 2


# -- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass
class SourceSpec:
  name: str
  train_files: str
  eval_files: str | None = None
  weight: float = 1.0
  format: str = 'text'
  fields: dict = dataclasses.field(default_factory=dict)
  text_field: str = 'text'
  text_split: str = 'paragraph'
  tfds_data_dir: str | None = None
  chat_template: str = 'auto'
  train_on: str = 'assistant'
  truncate: str = 'prompt'
  bad_records: str = 'fail'
  packing: str = 'auto'
  streaming: str = 'auto'
  shuffle_buffer: int = 10_000

  @property
  def streamed(self) -> bool:
    """Whether the source is read as a stream: asked for, or by default a Hub dataset while the
    Hub is reachable (offline, the download path finds a dataset in the datasets cache)."""
    if self.streaming != 'auto':
      return self.streaming == 'true'
    first = self.train_files.split(',')[0].strip()
    return sources.hub_name(first) and not sources.hub_offline()

  @property
  def pack_mode(self) -> str:
    if self.packing != 'auto':
      return self.packing
    return {'text': 'stream', 'preference': 'none'}.get(self.format, 'whole')


def _get(cfg, key, default=None):
  try:
    return cfg[key] if key in cfg else default
  except (KeyError, AttributeError):
    return default


def source_specs(data_cfg) -> list[SourceSpec]:
  """data.train_files (one source) or data.mixture (several), with the data section's defaults."""
  base = {k: _get(data_cfg, k) for k in SOURCE_KEYS if _get(data_cfg, k) is not None}
  base.pop('weight', None)
  base.pop('name', None)
  entries = list(_get(data_cfg, 'mixture', ()) or ())
  if entries and base.get('train_files'):
    raise ConfigError('set data.train_files or data.mixture, not both')
  if not entries:
    if not base.get('train_files'):
      raise ConfigError('no training data: set --config.data.train_files=PATH (or data.mixture)')
    entries = [{}]
  specs = []
  for i, entry in enumerate(entries):
    entry = dict(entry.items()) if hasattr(entry, 'items') else entry
    if not isinstance(entry, dict):
      raise ConfigError(f'data.mixture[{i}] is {type(entry).__name__}; expected a dict like '
                        "{'train_files': PATH, 'weight': 0.8}")
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
      raise ConfigError(f'data.mixture[{i}] has unknown keys {unknown}; allowed: {list(SOURCE_KEYS)}')
    merged = {**base, **entry}
    if not merged.get('train_files'):
      raise ConfigError(f'data.mixture[{i}] needs train_files')
    if len(entries) > 1 and 'eval_files' not in entry:
      merged.pop('eval_files', None)  # a mixture entry holds out its own eval data
    merged['fields'] = formats.parse_fields(merged.get('fields'))
    merged['name'] = str(merged.get('name') or _default_name(merged['train_files']))
    if merged.get('packing', 'auto') not in PACKINGS:
      raise ConfigError(f'data.packing={merged["packing"]!r}; choose one of {PACKINGS}')
    if 'streaming' in merged:  # True / 'true' / 'auto' ...
      merged['streaming'] = str(merged['streaming']).lower()
      if merged['streaming'] not in STREAMING:
        raise ConfigError(f'data.streaming={merged["streaming"]!r}; choose one of {STREAMING}')
    if int(merged.get('shuffle_buffer', 0)) < 0:
      raise ConfigError(f'data.shuffle_buffer={merged["shuffle_buffer"]} is negative; 0 reads a '
                        'stream in order')
    specs.append(SourceSpec(**merged))
  names = [s.name for s in specs]
  for i, s in enumerate(specs):
    if names.count(s.name) > 1:
      s.name = f'{s.name}_{i}'
  if len({s.format == 'preference' for s in specs}) > 1:
    raise ConfigError('a mixture cannot combine preference pairs with other formats')
  for s in specs:
    if s.format == 'preference' and s.pack_mode == 'stream':
      raise ConfigError('preference pairs cannot be stream-packed; use data.packing=none or whole')
    if s.format == 'kto' and s.pack_mode == 'stream':
      raise ConfigError('KTO examples cannot be stream-packed; use data.packing=whole or none')
  return specs


def _default_name(files: str) -> str:
  first = files.split(',')[0].strip()
  if first.startswith(sources.HF_PREFIX):
    path, _ = sources.hf_path_and_split(first)
    return os.path.basename(os.path.normpath(path)) or 'data'
  if first.startswith((sources.TFDS_PREFIX, sources.BUILTIN_PREFIX)):
    return first.split(':')[1].split('/')[0]
  return os.path.splitext(os.path.basename(first))[0].replace('*', 'all') or 'data'


# -- tokenizer ----------------------------------------------------------------------------------


def load_tokenizer(data_cfg, workdir: str):
  """The configured tokenizer, or one trained on the training data and kept in the workdir."""
  if data_cfg.tokenizer:
    return tokenizer_lib.load(data_cfg.tokenizer)
  path = os.path.join(workdir, 'tokenizer.model')
  if os.path.isfile(path):
    return tokenizer_lib.Tokenizer(path)
  specs = source_specs(data_cfg)
  special = []
  for spec in specs:
    if spec.format != 'text':
      special += [t for t in chat.special_tokens_for(spec.chat_template) if t not in special]

  def docs():
    for spec in specs:
      records = _load(spec, spec.train_files, spec.streamed)
      parser = formats.Encoder(spec.format, None, data_cfg.seq_len, fields=spec.fields,
                               text_field=spec.text_field)
      if isinstance(records, sources.Stream):  # its first records, in its own order, as read
        stream, records = records, itertools.islice(records.iterate(), TOKENIZER_STREAM_RECORDS)
        first = next(records, None)
        if first is not None:
          _check_schema(sources.Records(stream.name, [first], lambda i: stream.where((0, 0))),
                        parser, spec.bad_records, columnar=True)
          records = itertools.chain([first], records)
      else:
        _check_schema(records, parser, spec.bad_records)
        records = map(records.__getitem__, range(len(records)))  # bound now, not at each item
      for record in records:
        try:
          yield parser.text_of(record)
        except DataError:
          continue  # reported when the corpus is built

  return tokenizer_lib.train_tokenizer(docs(), path, data_cfg.tokenizer_vocab_size,
                                       data_cfg.tokenizer_model_type, seed=data_cfg.seed,
                                       special_tokens=special)


def check_vocab(tokenizer, model_vocab_size: int) -> None:
  if tokenizer.vocab_size > model_vocab_size:
    raise DataError(f'tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size='
                    f'{model_vocab_size}; set --config.model.vocab_size={tokenizer.vocab_size} '
                    'or use the model\'s own tokenizer')


# -- sources ------------------------------------------------------------------------------------


def _load(spec: SourceSpec, files: str, streamed: bool = False) -> sources.Records | sources.Stream:
  return sources.load(files, text_split=spec.text_split, bad_records=spec.bad_records,
                      data_dir=spec.tfds_data_dir, streaming=streamed)


def _first_records(stream: sources.Stream, n: int, keep=None, **options) -> sources.Records:
  """Up to the first n records (those `keep` accepts) of epoch 0 of the stream, as Records that
  say where in the stream each came from."""
  records, positions = [], []
  for offset, record in enumerate(stream.iterate(**options)):
    if keep is None or keep(record):
      records.append(record)
      positions.append((0, offset))
      if len(records) >= n:
        break
  return sources.Records(stream.name, records, lambda i: stream.where(positions[i]))


@dataclasses.dataclass
class Source:
  """One source, loaded: its train and held-out records and how to encode and pack them. A
  streamed source's train is a Stream, and `keep` tells its training records from held-out ones."""
  spec: SourceSpec
  train: sources.Records | sources.Stream
  eval: sources.Records
  encoder: formats.Encoder
  keep: object = None

  @property
  def pairs(self) -> bool:
    return self.spec.format == 'preference'

  @property
  def streamed(self) -> bool:
    return isinstance(self.train, sources.Stream)

  def stream_options(self, seed: int) -> dict:
    return dict(seed=seed, shuffle_buffer=int(self.spec.shuffle_buffer))

  def packer(self, lane, seq_len: int, pad_id: int, *, finite: bool = False, n_records=None):
    if n_records is None and self.streamed:
      max_empty = streaming.MAX_EMPTY
    else:
      max_empty = 20 * (n_records if n_records is not None else len(self.train)) + 1000
    kw = dict(max_empty=max_empty, finite=finite)
    mode = self.spec.pack_mode
    if mode == 'stream':
      return packing.StreamPacker(lane, seq_len, pad_id, **kw)
    return packing.BinPacker(lane, seq_len, pad_id, per_row=1 if mode == 'none' else 0,
                             pairs=self.pairs, **kw)


def _check_schema(records: sources.Records, encoder: formats.Encoder, policy: str, *,
                  columnar: bool = False) -> None:
  """A columnar source (Hugging Face, TFDS, a stream) has one schema: a field its first record
  lacks, every record lacks. Under data.bad_records=fail, said at once (such a source is not read
  up front as files are), before any training; under skip, the bad records are counted as they
  are read."""
  columnar = columnar or not isinstance(records.items, list)
  if policy == 'fail' and columnar and len(records):
    try:
      encoder.parse(records[0], records.where(0))
    except chat.EmptyContent:
      pass


def _validated(records: sources.Records, encoder: formats.Encoder, policy: str) -> sources.Records:
  """Checks in-memory records up front, so a bad record fails now with its file and line."""
  if not isinstance(records.items, list):
    _check_schema(records, encoder, policy)
    return records
  return records.filter(encoder.check, policy)


def load_source(spec: SourceSpec, data_cfg, tokenizer) -> Source:
  chunk = spec.format == 'text' and spec.pack_mode != 'stream'
  encoder = formats.Encoder(spec.format, tokenizer, data_cfg.seq_len, fields=spec.fields,
                            text_field=spec.text_field, chat_template=spec.chat_template,
                            train_on=spec.train_on, truncate=spec.truncate, chunk_text=chunk,
                            bad_records=spec.bad_records)
  if spec.streamed:
    return _load_stream(spec, data_cfg, encoder)
  records = _validated(_load(spec, spec.train_files), encoder, spec.bad_records)
  if not len(records):
    raise DataError(f'{spec.train_files}: no usable records ({records.skipped_summary() or "empty"})')
  if spec.eval_files:
    held_out = _validated(_load(spec, spec.eval_files), encoder, spec.bad_records)
    train = records
  else:
    n = len(records)
    n_eval = min(max(1, int(round(n * data_cfg.eval_fraction))), _get(data_cfg, 'eval_max_examples', n))
    if n_eval >= n:
      raise DataError(f'{spec.train_files}: {n} records are too few to hold out {n_eval} for '
                      'evaluation; add data or set data.eval_files')
    rng = np.random.default_rng([data_cfg.seed, 0x65766c])
    excluded = np.sort(rng.choice(n, size=n_eval, replace=False))
    train, held_out = records.without(excluded), records.subset(excluded)
  return Source(spec, train, held_out, encoder)


def _load_stream(spec: SourceSpec, data_cfg, encoder: formats.Encoder) -> Source:
  """A streamed source: held-out records from data.eval_files (their first eval_max_examples), or
  chosen by content hash (streaming.hold_out), and the stream itself for training."""
  stream = _load(spec, spec.train_files, streamed=True)
  max_examples = int(_get(data_cfg, 'eval_max_examples', 2000))
  keep = None
  if spec.eval_files:
    held_out = _load(spec, spec.eval_files, spec.streamed)
    if isinstance(held_out, sources.Stream):
      held_out = _first_records(held_out, max_examples)
  else:
    records, keep = streaming.hold_out(stream, data_cfg.eval_fraction, max_examples, data_cfg.seed)
    held_out = sources.Records(f'{spec.train_files} (held out)', records,
                               lambda i: f'{spec.train_files}[held-out record {i}]')
  return Source(spec, stream, _validated(held_out, encoder, spec.bad_records), encoder, keep)


# -- corpus -------------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainData:
  """What a BatchIterator reads: the sources, their mixture, and the shapes."""
  sources: list[Source]
  mixture: mixture.Mixture
  seq_len: int
  pad_id: int
  seed: int
  prefetch: int = 2

  @property
  def pairs(self) -> bool:
    return self.sources[0].pairs

  def seed_of(self, s: int) -> int:
    return int(np.random.SeedSequence([self.seed, s]).generate_state(1)[0])

  def shuffled(self, s: int, *, process_index: int = 0, process_count: int = 1):
    """Source s's records, reshuffled every epoch, repeated forever: a grain MapDataset, or for a
    streamed source this process's streaming.Reader."""
    src = self.sources[s]
    if src.streamed:
      return streaming.Reader(src.train, process_index=process_index, process_count=process_count,
                              keep=src.keep, **src.stream_options(self.seed_of(s)))
    return grain.MapDataset.source(src.train).shuffle(seed=self.seed_of(s)).repeat()

  def packers(self, lane: int, n_lanes: int, shuffled: list) -> list:
    return [src.packer(streaming.Lane(shuffled[s], src.encoder) if src.streamed else
                       shuffled[s][lane::n_lanes].map(src.encoder), self.seq_len, self.pad_id)
            for s, src in enumerate(self.sources)]


@dataclasses.dataclass
class Corpus:
  train: TrainData
  eval: dict  # packed held-out rows
  unigram_log_probs: np.ndarray  # [V] add-one smoothed, from a sample of trained target tokens
  sample_efficiency: float  # packing efficiency on the sample
  notes: dict  # source name -> counts of skipped/truncated records in the sample and at load

  def describe(self) -> str:
    """One line for the run log."""
    rows = self.eval['tokens' if 'tokens' in self.eval else 'chosen_tokens']
    parts = [f'{"streamed" if s.streamed else f"{len(s.train):,}"} {s.spec.name} records '
             f'({s.spec.format}, packing {s.spec.pack_mode}, weight {w:.2f})'
             for s, w in zip(self.train.sources, self.train.mixture.weights)]
    line = (f'data: {"; ".join(parts)}; {len(rows):,} held-out rows x {self.train.seq_len}; '
            f'packing efficiency {self.sample_efficiency:.1%}')
    skipped = '; '.join(f'{name}: {text}' for name, text in self.notes.items() if text)
    return line + (f'; skipped {skipped}' if skipped else '')


def build_corpus(data_cfg, tokenizer) -> Corpus:
  specs = source_specs(data_cfg)
  loaded = [load_source(spec, data_cfg, tokenizer) for spec in specs]
  formats.check_labels([s.encoder for s in loaded], data_cfg.train_files)
  train = TrainData(loaded, mixture.Mixture([s.name for s in specs], [s.weight for s in specs],
                                            data_cfg.seed),
                    data_cfg.seq_len, tokenizer.pad_id, data_cfg.seed,
                    int(_get(data_cfg, 'prefetch', 2)))
  eval_rows, sample_rows, notes = [], [], {}
  for s, src in enumerate(loaded):
    # A sample in training order: shows the data encodes at all, and what packing achieves.
    if src.streamed:  # the first records one process would read
      sample = _first_records(src.train, SAMPLE_RECORDS, src.keep,
                              **src.stream_options(train.seed_of(s)))
      _check_schema(sample, src.encoder, src.spec.bad_records, columnar=True)
      n, records = len(sample), grain.MapDataset.source(sample)
    else:
      n = min(len(src.train), SAMPLE_RECORDS)
      records = train.shuffled(s)[:n]
    rows, counts = _pack_finite(src, records, n, data_cfg.seq_len, tokenizer.pad_id)
    if rows is None:
      raise DataError(f'{src.spec.name}: no usable examples in the first {n} records '
                      f'({_counts_text(counts) or "all empty"}); the data is empty after filtering: '
                      'check data.format, data.fields, data.seq_len and data.truncate')
    sample_rows.append(rows)
    notes[src.spec.name] = '; '.join(t for t in (src.train.skipped_summary(), counts and
                                                 f'{_counts_text(counts)} in the first {n} records') if t)
    rows, counts = _pack_finite(src, grain.MapDataset.source(src.eval), len(src.eval),
                                data_cfg.seq_len, tokenizer.pad_id)
    if rows is None:
      raise DataError(f'{src.spec.name}: none of the {len(src.eval)} held-out records gave an '
                      f'example ({_counts_text(counts) or "all empty"}); set data.eval_files or '
                      'raise data.eval_fraction')
    eval_rows.append(rows)
  eval_all = {k: np.concatenate([r[k] for r in eval_rows]) for k in eval_rows[0]}
  sample_all = {k: np.concatenate([r[k] for r in sample_rows]) for k in sample_rows[0]}
  prefix = 'chosen_' if train.pairs else ''
  # What the loss sees (KTO's undesirable examples carry negative weights: lm/data/preference.py).
  tokens = sample_all[prefix + 'targets'][sample_all[prefix + 'weights'] != 0]
  counts = np.bincount(tokens.astype(np.int64), minlength=tokenizer.vocab_size)[:tokenizer.vocab_size]
  counts = counts.astype(np.float64) + 1.0
  return Corpus(train=train, eval=eval_all, unigram_log_probs=np.log(counts / counts.sum()),
                sample_efficiency=packing.packing_efficiency(sample_all), notes=notes)


def _pack_finite(src: Source, records: grain.MapDataset, n: int, seq_len: int, pad_id: int):
  """All rows of n records (None if none) and the counts of what was skipped or truncated."""
  packer = src.packer(records.map(src.encoder), seq_len, pad_id, finite=True, n_records=n)
  rows = packing.pack_all(packer)
  return rows, {k: v for k, v in packer.counts.items() if k != 'tokens'}


def _counts_text(counts: dict) -> str:
  return ', '.join(f'{v} {k}' for k, v in sorted(counts.items()))


def unigram_perplexity(corpus: Corpus) -> float:
  """Perplexity of the training-sample unigram distribution on the held-out targets: the baseline
  any model that learned something beyond token frequencies must beat."""
  prefix = 'chosen_' if 'chosen_weights' in corpus.eval else ''
  w = np.abs(corpus.eval[prefix + 'weights'])
  nll = -corpus.unigram_log_probs[np.minimum(corpus.eval[prefix + 'targets'],
                                             len(corpus.unigram_log_probs) - 1)]
  return float(math.exp(np.sum(nll * w) / max(np.sum(w), 1.0)))


# -- batches ------------------------------------------------------------------------------------


class _RowsData:
  """Already packed rows (a dict of arrays) as TrainData: one source of row records."""

  def __init__(self, rows: dict, seed: int):
    self.n = len(next(iter(rows.values())))
    self.rows, self.seed, self.prefetch = rows, seed, 0
    self.mixture = mixture.Mixture(['rows'], [1.0], seed)
    self.pairs = 'chosen_tokens' in rows

  def shuffled(self, s, **process):
    del s, process
    seed = int(np.random.SeedSequence([self.seed, 0]).generate_state(1)[0])
    return grain.MapDataset.range(self.n).shuffle(seed=seed).repeat()

  def packers(self, lane, n_lanes, shuffled):
    rows = self.rows
    lane_ds = shuffled[0][lane::n_lanes].map(lambda i: {k: v[i] for k, v in rows.items()})
    return [packing.RowPacker(lane_ds, 0, 0, max_empty=1)]


class _LaneBatches(grain.IterDataset):
  """The batches of lanes [first, last) of a global batch of `n_lanes` rows (`process`: this
  process's index and the process count, for streamed sources)."""

  def __init__(self, data, n_lanes: int, lanes: range, process: tuple[int, int] = (0, 1)):
    super().__init__()
    self.data, self.n_lanes, self.lanes, self.process = data, n_lanes, lanes, process

  def __iter__(self):
    return _LaneBatchIterator(self.data, self.n_lanes, self.lanes, self.process)

  def __str__(self):
    return f'LaneBatches(lanes={self.lanes.start}..{self.lanes.stop} of {self.n_lanes})'


class _LaneBatchIterator(grain.DatasetIterator):

  def __init__(self, data, n_lanes: int, lanes: range, process: tuple[int, int] = (0, 1)):
    super().__init__()
    self.data, self.n_lanes, self.lanes = data, n_lanes, lanes
    shuffled = [data.shuffled(s, process_index=process[0], process_count=process[1])
                for s in range(len(data.mixture))]
    self.readers = {s: r for s, r in enumerate(shuffled) if isinstance(r, streaming.Reader)}
    self.packers = {r: data.packers(r, n_lanes, shuffled) for r in lanes}
    self.step = 0

  def __next__(self):
    assignment = self.data.mixture.assign(self.step, self.n_lanes)[self.lanes.start:self.lanes.stop]
    rows = [self.packers[r][int(s)].next_row() for r, s in zip(self.lanes, assignment)]
    self.step += 1
    if self.readers and self.step % 64 == 0:  # lanes forget the positions no state will name
      for s in self.readers:
        for r in self.lanes:
          self._packer_state(s, self.packers[r][s])
    return {k: np.stack([row[k] for row in rows]) for k in rows[0]}

  def _packer_state(self, s: int, packer) -> dict:
    state = packer.get_state()
    if s in self.readers:  # where the records it may read again are in the stream
      state['stream'] = packer.lane.get_state(packer.referenced())
    return state

  def get_state(self):
    state = {'step': self.step,
             'lanes': {str(r): [self._packer_state(s, p) for s, p in enumerate(self.packers[r])]
                       for r in self.lanes}}
    if self.readers:
      state['streams'] = {str(s): reader.get_state() for s, reader in self.readers.items()}
    return state

  def set_state(self, state):
    self.step = int(state['step'])
    names = self.data.mixture.names
    for s, reader in self.readers.items():
      lane_states = [state['lanes'][str(r)][s].get('stream') for r in self.lanes]
      if None in lane_states or str(s) not in (state.get('streams') or {}):
        raise DataError(f'{names[s]}: the checkpoint read this source with random access, not as a '
                        'stream; resume with data.streaming=false (or start a new --workdir)')
      streaming.restore(reader, [self.packers[r][s].lane for r in self.lanes], lane_states,
                        state['streams'][str(s)])
    for r in self.lanes:
      for s, (p, packer_state) in enumerate(zip(self.packers[r], state['lanes'][str(r)])):
        if s not in self.readers and 'stream' in packer_state:
          raise DataError(f'{names[s]}: the checkpoint read this source as a stream; resume with '
                          'data.streaming=true (or start a new --workdir)')
        p.set_state(packer_state)


class BatchIterator:
  """This process's share of every global batch, forever; exactly resumable from `get_state()`.

  `data` is a Corpus's TrainData (or a dict of packed rows). Process p of P yields rows
  [p*B/P, (p+1)*B/P) of each global batch of B rows and reads only the records of those rows.
  """

  def __init__(self, data, global_batch: int, seed: int | None = None, *, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1, prefetch: int | None = None):
    del shuffle  # training batches are always shuffled; eval uses fixed-order rows
    if isinstance(data, dict):
      data = _RowsData(data, 0 if seed is None else seed)
    elif seed is not None and seed != data.seed:
      data = dataclasses.replace(data, seed=seed, mixture=mixture.Mixture(
          data.mixture.names, data.mixture.weights, seed))
    if global_batch % process_count:
      raise DataError(f'data.batch_size={global_batch} is not divisible by {process_count} processes')
    self.data, self.global_batch = data, global_batch
    self.process_index, self.process_count = process_index, process_count
    local = global_batch // process_count
    self.lanes = range(process_index * local, (process_index + 1) * local)
    self.prefetch = data.prefetch if prefetch is None else prefetch
    self._dataset = _LaneBatches(data, global_batch, self.lanes, (process_index, process_count))
    if self.prefetch > 0:
      self._dataset = grain.experimental.ThreadPrefetchIterDataset(
          self._dataset, prefetch_buffer_size=self.prefetch)
    self._iter = iter(self._dataset)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iter)

  def local_state(self) -> dict:
    """This process's lanes (and streams) only."""
    state = self._iter.get_state()
    out = {'version': STATE_VERSION, 'batch_size': self.global_batch, 'step': state['step'],
           'lanes': state['lanes']}
    if 'streams' in state:  # each process reads its own share of a stream
      out.update(processes=self.process_count, streams={str(self.process_index): state['streams']})
    return out

  def get_state(self) -> dict:
    """JSON-serialisable; with several JAX processes, every process's lanes and stream positions
    (a collective: all processes must call it together, as checkpoint saving does)."""
    state = self.local_state()
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      for other in _allgather_json({'lanes': state['lanes'], 'streams': state.get('streams', {})}):
        state['lanes'].update(other['lanes'])
        if 'streams' in state:
          state['streams'].update(other['streams'])
    return state

  def set_state(self, state: dict) -> None:
    if state.get('version') != STATE_VERSION:
      raise DataError('the checkpoint\'s data position was written by an older data pipeline; '
                      'resume with the version that wrote it or start a new --workdir')
    if state['batch_size'] != self.global_batch:
      raise DataError(f'the checkpoint was trained with data.batch_size={state["batch_size"]}, not '
                      f'{self.global_batch}; resume with the same batch size')
    missing = [r for r in self.lanes if str(r) not in state['lanes']]
    if missing:
      raise DataError(f'the data state lacks rows {missing[:4]}...; it was saved by a run whose '
                      'processes did not gather their states')
    streams = None
    if 'streams' in state:
      if state.get('processes') != self.process_count:
        raise DataError(f'the checkpoint streamed its data on {state.get("processes")} processes, '
                        f'not {self.process_count}: each reads its own share of a stream; resume '
                        'on as many processes')
      streams = state['streams'][str(self.process_index)]
    self._iter.set_state({'step': state['step'], 'lanes': state['lanes'],
                          **({'streams': streams} if streams is not None else {})})

  def metrics(self) -> dict[str, float]:
    """Cumulative counts over the rows this process has yielded: tokens per source (non-padding
    positions) and records skipped or truncated."""
    state = self._iter.get_state()
    names = self.data.mixture.names
    out = {f'data/tokens_{n}': 0.0 for n in names}
    for lane in state['lanes'].values():
      for name, packer_state in zip(names, lane):
        for key, value in packer_state['counts'].items():
          key = f'data/tokens_{name}' if key == 'tokens' else 'data/' + key.replace(' ', '_')
          out[key] = out.get(key, 0.0) + value
    return out

  def close(self) -> None:
    close = getattr(self._iter, 'close', None)
    if close:
      close()


def _allgather_json(obj) -> list:
  """Every process's `obj` (JSON), in process order."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(json.dumps(obj).encode('utf-8'), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)], np.int64))).reshape(-1)
  buf = np.zeros(int(sizes.max()), np.uint8)
  buf[:len(data)] = data
  gathered = np.asarray(multihost_utils.process_allgather(buf))
  return [json.loads(bytes(gathered[p, :sizes[p]]).decode('utf-8')) for p in range(len(sizes))]
