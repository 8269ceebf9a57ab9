"""Where records come from: local files and globs, TFDS and Hugging Face datasets, and a built-in
offline corpus.

Every source becomes `Records`: random access to dict records (a text file's documents become
{'text': ...}), each able to say where it came from (`path:line`) for error messages. Asked to
stream (`load(..., streaming=True)`), an `hf:` dataset or local data files become a `Stream`
instead: records in order from a `datasets.IterableDataset`, read by lm/data/streaming.py.

  path, glob, or 'a.jsonl,b/*.txt'  .jsonl, .json (a list of records), .parquet, anything else text;
                                     each may be compressed, .gz or .zst (a.jsonl.gz, b.txt.zst)
  tfds:NAME[:SPLIT]                  TFDS through its array_record data source (no TensorFlow);
                                     NAME may carry a config and version, 'wiki40b/en:1.3.0'
  builtin:python-docs                CPython's own documentation (pydoc topics, stdlib docstrings)
  hf:FOLDER[:SPLIT]                  a Hugging Face `datasets` folder: what save_to_disk wrote (a
                                     Dataset, or a DatasetDict and its SPLIT), or Arrow/Parquet files
  hf:NAME[:SPLIT]                    a Hugging Face Hub dataset, downloaded to the datasets cache
                                     (memory-mapped Arrow: random access), or streamed

`datasets` never runs a dataset script for lm: a folder holding a loading script is refused.

Text files split into documents by `text_split`: 'paragraph' (blank-line separated), 'line', or
'file'. Malformed lines and non-UTF-8 bytes follow `bad_records`: 'fail' raises a DataError naming
the file and line; 'skip' drops them and counts them in `Records.skipped`.
"""

from __future__ import annotations

import ast
import collections
import functools
import glob
import hashlib
import json
import logging
import os
import re
import sys
import sysconfig
import tempfile

import numpy as np

from lm.errors import DataError

BUILTIN_PREFIX = 'builtin:'
TFDS_PREFIX = 'tfds:'
HF_PREFIX = 'hf:'
TEXT_SPLITS = ('paragraph', 'line', 'file')
BAD_RECORD_POLICIES = ('fail', 'skip')


class Records:
  """Random-access records of one source, with provenance and a count of what was skipped."""

  def __init__(self, name: str, items, where, skipped: collections.Counter | None = None,
               first_skipped: dict | None = None):
    self.name = name
    self.items = items  # a list, or any object with __len__ and __getitem__
    self._where = where
    self.skipped = skipped if skipped is not None else collections.Counter()
    self.first_skipped = first_skipped if first_skipped is not None else {}

  def __len__(self) -> int:
    return len(self.items)

  def __getitem__(self, i: int) -> dict:
    return self.items[i]

  def where(self, i: int) -> str:
    return self._where(i)

  def skip(self, reason: str, where: str) -> None:
    self.skipped[reason] += 1
    self.first_skipped.setdefault(reason, where)

  def skipped_summary(self) -> str:
    return '; '.join(f'{n} {reason} (first: {self.first_skipped[reason]})'
                     for reason, n in sorted(self.skipped.items()))

  def subset(self, index: np.ndarray) -> Records:
    """The records at `index` (an int array), in that order."""
    index = np.asarray(index, np.int64)
    return Records(self.name, _Indexed(self.items, index), lambda i: self._where(int(index[i])),
                   self.skipped, self.first_skipped)

  def without(self, excluded: np.ndarray) -> Records:
    """All records except the sorted indices `excluded`, in order; O(len(excluded)) memory."""
    excluded = np.asarray(excluded, np.int64)
    items = _Complement(self.items, excluded)
    return Records(self.name, items, lambda i: self._where(items.source_index(i)),
                   self.skipped, self.first_skipped)

  def filter(self, check, policy: str) -> Records:
    """Records for which `check(record)` returns None. Otherwise it returns (problem, fatal): a
    fatal problem is raised under policy 'fail', and every other is counted. Only for in-memory
    sources: it reads every record."""
    keep = []
    for i in range(len(self)):
      result = check(self[i])
      if result is None:
        keep.append(i)
        continue
      problem, fatal = result
      if fatal and policy == 'fail':
        raise DataError(f'{self.where(i)}: {problem}; fix the record or set data.bad_records=skip')
      self.skip(problem, self.where(i))
    return self if len(keep) == len(self) else self.subset(np.asarray(keep, np.int64))


class _Indexed:

  def __init__(self, items, index):
    self.items, self.index = items, index

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i):
    return self.items[int(self.index[i])]


class _Complement:
  """items minus the sorted positions `excluded`: the i-th kept item is found by binary search."""

  def __init__(self, items, excluded):
    self.items = items
    # kept index i maps to i + (number of excluded positions at or before it)
    self._shifted = excluded - np.arange(len(excluded))
    self._n = len(items) - len(excluded)

  def __len__(self):
    return self._n

  def source_index(self, i: int) -> int:
    return int(i + np.searchsorted(self._shifted, i, side='right'))

  def __getitem__(self, i):
    return self.items[self.source_index(i)]


def expand_files(spec: str) -> list[str]:
  """'a.txt,b/*.jsonl' -> sorted existing paths; a pattern that matches nothing is an error."""
  paths = []
  for part in (p.strip() for p in spec.split(',') if p.strip()):
    matches = sorted(glob.glob(part)) if any(c in part for c in '*?[') else [part]
    if not matches or not all(os.path.isfile(m) for m in matches):
      raise DataError(f'data file {part!r} not found; check data.train_files / data.eval_files')
    paths.extend(matches)
  if not paths:
    raise DataError('no data files given; set --config.data.train_files=PATH')
  return paths


def _decode(raw: bytes, path: str, policy: str, records: _FileRecords) -> str:
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    if policy == 'fail':
      raise DataError(f'{path}:{line}: byte {e.start} is not valid UTF-8; re-encode the file as UTF-8 '
                      'or set data.bad_records=skip') from None
    records.skip('lines with invalid UTF-8 (bytes replaced)', f'{path}:{line}')
    return raw.decode('utf-8', errors='replace')


class _FileRecords:
  """Accumulates records of several files with (file, line) provenance."""

  def __init__(self):
    self.items, self.files, self.file_of, self.line_of = [], [], [], []
    self.skipped, self.first_skipped = collections.Counter(), {}

  def add(self, record, file_index: int, line: int) -> None:
    self.items.append(record)
    self.file_of.append(file_index)
    self.line_of.append(line)

  def skip(self, reason: str, where: str) -> None:
    self.skipped[reason] += 1
    self.first_skipped.setdefault(reason, where)

  def where(self, i: int) -> str:
    f, line = self.files[self.file_of[i]], self.line_of[i]
    return f'{f}:{line}' if line > 0 else f'{f}[record {-line}]'


def _read_jsonl(path, f, raw, policy, out):
  for lineno, line in enumerate(raw.split(b'\n'), 1):
    if not line.strip():
      continue
    try:
      text = line.decode('utf-8')
    except UnicodeDecodeError as e:
      if policy == 'fail':
        raise DataError(f'{path}:{lineno}: byte {e.start} of the line is not valid UTF-8; re-encode '
                        'the file as UTF-8 or set data.bad_records=skip') from None
      out.skip('lines with invalid UTF-8', f'{path}:{lineno}')
      continue
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      if policy == 'fail':
        raise DataError(f'{path}:{lineno}: malformed JSON ({e.msg}); fix or remove the line, or set '
                        'data.bad_records=skip') from None
      out.skip('malformed JSON lines', f'{path}:{lineno}')
      continue
    if not isinstance(record, dict):
      if policy == 'fail':
        raise DataError(f'{path}:{lineno}: expected a JSON object, got {type(record).__name__}')
      out.skip('lines that are not JSON objects', f'{path}:{lineno}')
      continue
    out.add(record, f, lineno)


def _read_json(path, f, raw, policy, out):
  text = _decode(raw, path, policy, out)
  try:
    records = json.loads(text)
  except json.JSONDecodeError as e:
    if e.msg == 'Extra data':  # one object per line under a .json name
      _read_jsonl(path, f, raw, policy, out)
      return
    raise DataError(f'{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file') from None
  if isinstance(records, dict) and len(records) == 1 and isinstance(next(iter(records.values())), list):
    records = next(iter(records.values()))  # {"data": [...]}
  if not isinstance(records, list):
    raise DataError(f'{path}: expected a JSON list of records (or one record per line)')
  for i, record in enumerate(records):
    if not isinstance(record, dict):
      if policy == 'fail':
        raise DataError(f'{path}[record {i}]: expected a JSON object, got {type(record).__name__}')
      out.skip('records that are not JSON objects', f'{path}[record {i}]')
      continue
    out.add(record, f, -i)


def _read_parquet(path, f, out):
  try:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError('reading parquet needs pyarrow: pip install pyarrow') from None
  try:
    rows = pq.read_table(path).to_pylist()
  except Exception as e:  # pyarrow raises several error types for broken files
    raise DataError(f'{path}: not a readable parquet file ({str(e)[:200]})') from None
  for i, record in enumerate(rows):
    out.add(record, f, -i)


def _read_text(path, f, raw, policy, text_split, out):
  text = _decode(raw, path, policy, out)
  if text_split == 'file':
    pieces = [(text, 1)]
  elif text_split == 'line':
    pieces = [(line, i) for i, line in enumerate(text.split('\n'), 1)]
  else:  # paragraphs: blank-line separated; remember each one's first line
    pieces, line = [], 1
    for block in text.split('\n\n'):
      lead = block[:len(block) - len(block.lstrip())].count('\n')
      pieces.append((block, line + lead))
      line += block.count('\n') + 2
  for doc, line in pieces:
    doc = doc.strip()
    if doc:
      out.add({'text': doc}, f, line)


COMPRESSED = ('.gz', '.zst')


def read_bytes(path: str) -> bytes:
  """The file's bytes, decompressed when it ends in .gz (gzip) or .zst (Zstandard)."""
  with open(path, 'rb') as fh:
    raw = fh.read()
  try:
    if path.endswith('.gz'):
      import gzip  # pylint: disable=import-outside-toplevel
      return gzip.decompress(raw)
    if path.endswith('.zst'):
      import zstandard  # pylint: disable=import-outside-toplevel
      return zstandard.ZstdDecompressor().stream_reader(raw).read()
  except Exception as e:  # gzip, zlib, EOFError and zstandard each raise their own
    kind = 'gzip' if path.endswith('.gz') else 'Zstandard'
    raise DataError(f'{path}: not a readable {kind} file ({str(e)[:120] or type(e).__name__}); '
                    f're-compress it or give the uncompressed file') from None
  return raw


def read_files(spec: str, *, text_split: str = 'paragraph', bad_records: str = 'fail') -> Records:
  out = _FileRecords()
  for f, path in enumerate(expand_files(spec)):
    out.files.append(path)
    name = path[:-len(next(e for e in COMPRESSED if path.endswith(e)))] if path.endswith(
        COMPRESSED) else path  # the format is the name's inner extension: a.jsonl.gz is jsonl
    if name.endswith('.parquet'):
      _read_parquet(path, f, out)
      continue
    raw = read_bytes(path)
    if name.endswith('.jsonl'):
      _read_jsonl(path, f, raw, bad_records, out)
    elif name.endswith('.json'):
      _read_json(path, f, raw, bad_records, out)
    else:
      _read_text(path, f, raw, bad_records, text_split, out)
  return Records(spec, out.items, out.where, out.skipped, out.first_skipped)


class _TfdsItems:
  """A TFDS data source whose bytes fields are decoded to str on access."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return _decode_tfds(self.source[int(i)])


def _decode_tfds(value):
  if isinstance(value, dict):
    return {k: _decode_tfds(v) for k, v in value.items()}
  if isinstance(value, bytes):
    return value.decode('utf-8', errors='replace')
  if isinstance(value, np.ndarray) and value.dtype == object:
    return [_decode_tfds(v) for v in value.tolist()]
  return value


def read_tfds(spec: str, data_dir: str | None = None) -> Records:
  """tfds:NAME[:SPLIT] through `tfds.data_source` (array_record files, random access)."""
  body = spec[len(TFDS_PREFIX):]
  name, _, split = body.partition(':')
  version = re.match(r'\d+\.\d+\.\d+', split)
  if version:  # tfds:name:1.0.0[:split]
    name += ':' + version.group(0)
    split = split[version.end():].lstrip(':')
  split = split or 'train'
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  try:
    source = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # TFDS raises many error types for a missing dataset
    raise DataError(f'{spec}: cannot open TFDS dataset {name!r} split {split!r} in '
                    f'{data_dir or "the default data_dir"} ({str(e).splitlines()[0][:200]}); prepare '
                    'it in array_record format (tfds build --file_format=array_record) and set '
                    'data.tfds_data_dir') from None
  return Records(spec, _TfdsItems(source), lambda i: f'{spec}[{i}]')


class _HfItems:
  """A `datasets.Dataset` as records: row i as a dict of Python values."""

  def __init__(self, dataset):
    self.dataset = dataset

  def __len__(self):
    return len(self.dataset)

  def __getitem__(self, i):
    return self.dataset[int(i)]


# What save_to_disk writes: a Dataset (state.json beside dataset_info.json), or a DatasetDict.
_SAVED_DATASET, _SAVED_DICT = 'state.json', 'dataset_dict.json'
_HUB_NAME = re.compile(r'[A-Za-z0-9][\w.-]*(/[\w.-]+)?')


def hf_path_and_split(spec: str) -> tuple[str, str | None]:
  """'hf:FOLDER_OR_NAME[:SPLIT]' -> (folder or name, split or None). A folder whose own name holds
  a colon is taken whole."""
  body = spec[len(HF_PREFIX):]
  if os.path.exists(body):
    return body, None
  path, colon, split = body.rpartition(':')
  return (path, split) if colon and path and split else (body, None)


def hub_name(spec: str) -> bool:
  """Whether `spec` is hf:NAME[:SPLIT] naming a Hub dataset (no local path of that name)."""
  if not spec.startswith(HF_PREFIX):
    return False
  path, _ = hf_path_and_split(spec)
  return not os.path.exists(path) and _looks_like_hub_name(path)


def hub_offline() -> bool:
  """Whether the Hugging Face Hub is switched off (HF_HUB_OFFLINE), as datasets sees it."""
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  return bool(datasets.config.HF_HUB_OFFLINE)


def _looks_like_hub_name(path: str) -> bool:
  # A path whose parent folder exists is a folder's path, mistyped, not a Hub name.
  return bool(_HUB_NAME.fullmatch(path)) and not path.startswith(('.', '/', '~')) and not os.path.isdir(
      path.split('/')[0])


def _datasets(spec: str):
  try:
    import datasets  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f'{spec}: Hugging Face datasets need the datasets package: pip install datasets') from None
  datasets.disable_progress_bars()
  # Its json reader logs a parse error before raising it; the error is reported once, as one line.
  logging.getLogger('datasets.packaged_modules.json.json').setLevel(logging.CRITICAL)
  return datasets


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _open_hf(spec: str, streaming: bool):
  """The split of an hf: source: a `datasets.Dataset`, or an `IterableDataset` when streaming."""
  path, split = hf_path_and_split(spec)
  datasets = _datasets(spec)
  if os.path.isdir(path):
    return _hf_folder(datasets, spec, path, split, streaming)
  if os.path.exists(path):
    raise DataError(f'{spec}: {path} is a file; hf: takes a dataset folder or a Hub dataset name '
                    '(give data files to data.train_files directly)')
  if not _looks_like_hub_name(path):
    raise DataError(f'{spec}: no folder {path!r} and not a Hub dataset name (NAME or OWNER/NAME); '
                    'check the path')
  try:
    return datasets.load_dataset(path, split=split or 'train', streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except  # offline, missing, private, bad split
    raise DataError(f'{spec}: cannot {"stream" if streaming else "load"} {path!r} from the Hugging '
                    f'Face Hub ({_first_line(e)}); without a network, save it elsewhere '
                    '(datasets.load_dataset(NAME).save_to_disk(DIR)), copy DIR here and use '
                    'hf:DIR') from None


def read_hf(spec: str) -> Records:
  """A Hugging Face dataset: a save_to_disk folder, a folder of Arrow/Parquet files, or a Hub
  name; one split of it (default: the only one, else 'train')."""
  return Records(spec, _HfItems(_open_hf(spec, streaming=False)), lambda i: f'{spec}[{i}]')


def _hf_folder(datasets, spec: str, path: str, split: str | None, streaming: bool = False):
  names = sorted(os.listdir(path))
  scripts = [n for n in names if n.endswith('.py')]
  if scripts:  # a dataset script is code; data files never run code in lm
    raise DataError(f'{spec}: {path} holds a dataset loading script ({scripts[0]}); lm never runs '
                    'dataset scripts (they are code): run it yourself if you trust it, save the '
                    'result with save_to_disk (or as Parquet) and point hf: at that folder')
  if _SAVED_DATASET in names or _SAVED_DICT in names:
    try:
      dataset = datasets.load_from_disk(path)
    except Exception as e:  # pylint: disable=broad-except  # a damaged folder fails in many ways
      raise DataError(f'{spec}: {path} is not a readable save_to_disk folder ({_first_line(e)}); '
                      'write it again with save_to_disk') from None
    if isinstance(dataset, datasets.DatasetDict):
      dataset = _split_of(spec, dataset, split)
    elif split not in (None, 'train'):
      raise DataError(f'{spec}: {path} holds one Dataset, not splits; drop :{split}')
    # Shards let the hosts split the stream and the shuffle reorder them; read in order, they
    # are the rows in order.
    return dataset.to_iterable_dataset(num_shards=max(1, min(len(dataset), 64))) if streaming else dataset
  data_files = [n for n in glob.glob(os.path.join(path, '**', '*'), recursive=True)
                if n.endswith(('.arrow', '.parquet'))]
  if not data_files:
    raise DataError(f'{spec}: {path} is not a dataset folder (no state.json or dataset_dict.json '
                    'from save_to_disk, no .arrow or .parquet files); save it with '
                    'Dataset.save_to_disk, or give its files to data.train_files')
  try:  # the datasets library's own Arrow/Parquet readers: no script, no code from the folder
    found = datasets.load_dataset(path, streaming=streaming)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{spec}: cannot read the data files in {path} ({_first_line(e)})') from None
  return _split_of(spec, found, split)


def _split_of(spec: str, splits, split: str | None):
  if split is None:
    split = next(iter(splits)) if len(splits) == 1 else 'train'
  if split not in splits:
    raise DataError(f'{spec}: no split {split!r} (splits: {", ".join(splits)}); name one as '
                    f'hf:PATH:SPLIT')
  return splits[split]


STREAM_BATCH = 1000  # records a stream reads at once


class Stream:
  """Records in order from a Hugging Face `datasets.IterableDataset`: no length and no random
  access. `iterate` reads one epoch of one process's share, shuffled or not, from any position;
  lm/data/streaming.py turns that into lanes and exact resume."""

  def __init__(self, name: str, dataset):
    self.name, self.dataset = name, dataset
    self.skipped, self.first_skipped = collections.Counter(), {}  # as Records: nothing is skipped here

  def where(self, position) -> str:
    epoch, offset = position
    return f'{self.name}[streamed record {offset}{f" of epoch {epoch}" if epoch else ""}]'

  def skipped_summary(self) -> str:
    return ''

  def iterate(self, epoch: int = 0, start: int = 0, *, shuffle_buffer: int = 0, seed: int = 0,
              process_index: int = 0, process_count: int = 1):
    """Records from position `start` of epoch `epoch`: the stream shuffled (shard order and a
    buffer of `shuffle_buffer` records, from `seed`, differently each epoch) and split between
    `process_count` hosts, as datasets does it; the first `start` records are read and dropped."""
    dataset = self.dataset
    if shuffle_buffer > 0:
      dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if process_count > 1:
      from datasets.distributed import split_dataset_by_node  # pylint: disable=import-outside-toplevel
      dataset = split_dataset_by_node(dataset, rank=process_index, world_size=process_count)
    if shuffle_buffer > 0:  # unshuffled, every epoch is read in the same order
      # On the dataset made above, never self.dataset: its epoch is shared by what is made from it.
      dataset.set_epoch(epoch)
    # In batches, the same records in the same order as one by one, read ~3x faster; the batches
    # before `start` are never turned into records.
    batches = dataset.iter(batch_size=STREAM_BATCH)
    offset = 0
    while True:
      try:
        batch = next(batches)
      except StopIteration:
        return
      except Exception as e:  # pylint: disable=broad-except  # a bad line, a broken file, the network
        raise DataError(f'{self.name}: cannot read the stream after {offset} records'
                        f'{f" of epoch {epoch}" if epoch else ""} ({_first_line(e)}); fix the data, or '
                        'read it without data.streaming (which names the file and line)') from None
      columns = list(batch)
      n = len(batch[columns[0]]) if columns else 0
      if offset + n > start:
        rows = zip(*(batch[c] for c in columns))
        yield from (dict(zip(columns, row)) for i, row in enumerate(rows, offset) if i >= start)
      offset += n


# Local files datasets streams with its own packaged readers (no script): the format by extension.
_STREAM_BUILDERS = {'.jsonl': 'json', '.json': 'json', '.parquet': 'parquet', '.arrow': 'arrow'}
_SAMPLE_BY = {'paragraph': 'paragraph', 'line': 'line', 'file': 'document'}


def stream_files(spec: str, *, text_split: str = 'paragraph') -> Stream:
  """Local data files (as read_files takes them) streamed by datasets' json, parquet, arrow or
  text reader; the files of one source share a format."""
  paths = expand_files(spec)
  kinds = set()
  for path in paths:
    name = path[:-len(next(e for e in COMPRESSED if path.endswith(e)))] if path.endswith(COMPRESSED) else path
    kinds.add(_STREAM_BUILDERS.get(os.path.splitext(name)[1], 'text'))
  if len(kinds) > 1:
    raise DataError(f'{spec}: streamed files of one source must share a format (got {sorted(kinds)}); '
                    'give each format its own data.mixture entry')
  builder = kinds.pop()
  datasets = _datasets(spec)
  options = {'sample_by': _SAMPLE_BY[text_split]} if builder == 'text' else {}
  try:
    dataset = datasets.load_dataset(builder, data_files=paths, split='train', streaming=True, **options)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{spec}: cannot stream these files ({_first_line(e)})') from None
  if builder == 'text':  # documents as read_files makes them: stripped, none empty
    dataset = dataset.map(lambda r: {'text': r['text'].strip()}).filter(lambda r: bool(r['text']))
  return Stream(spec, dataset)


def open_stream(spec: str, *, text_split: str = 'paragraph') -> Stream:
  """`spec` streamed: an hf: folder or Hub name, or local data files."""
  if spec.startswith((TFDS_PREFIX, BUILTIN_PREFIX)):
    raise DataError(f'{spec}: data.streaming=true applies to hf: datasets and local data files; '
                    f'{spec.split(":")[0]}: sources are read with random access: set '
                    'data.streaming=auto')
  if spec.startswith(HF_PREFIX):
    return Stream(spec, _open_hf(spec, streaming=True))
  return stream_files(spec, text_split=text_split)


_DEFINITIONS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Nodes that can hold a definition: statements, and the two non-statement nodes with bodies.
_BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)


def _definitions(tree: ast.Module):
  """The module, class and function nodes of `tree` in `ast.walk` order, visiting only statements:
  expressions cannot hold a definition, and skipping them makes this several times faster."""
  queue = collections.deque([tree])
  while queue:
    node = queue.popleft()
    if isinstance(node, _DEFINITIONS):
      yield node
    for field in node._fields:
      value = getattr(node, field, None)
      if isinstance(value, list):
        queue.extend(v for v in value if isinstance(v, _BLOCKS))
      elif isinstance(value, _BLOCKS):
        queue.append(value)


# Parsing the stdlib takes seconds of CPU on every start; its docstrings only change with Python.
PYTHON_DOCS_CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                                 'lm', 'python_docs')


@functools.cache
def python_docs() -> tuple[str, ...]:
  """CPython's own documentation: the pydoc topics and stdlib docstrings of 200+ characters.
  Cached in this process (the tokenizer and the corpus both read it) and on disk, per Python
  build and stdlib folder (a changed folder, or a damaged file, is parsed again)."""
  root = sysconfig.get_paths()['stdlib']
  key = hashlib.sha256(f'1|{sys.version}|{root}|{os.stat(root).st_mtime_ns}'.encode()).hexdigest()
  path = os.path.join(PYTHON_DOCS_CACHE, key[:16] + '.json')
  try:
    with open(path, encoding='utf-8') as f:
      return tuple(json.load(f))
  except (OSError, ValueError):
    pass
  docs = _parse_python_docs(root)
  try:  # a cache that cannot be written only costs the parse next time
    os.makedirs(PYTHON_DOCS_CACHE, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=PYTHON_DOCS_CACHE, prefix='.python_docs-')
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      json.dump(docs, f)
    os.replace(tmp, path)
  except OSError:
    pass
  return tuple(docs)


def _parse_python_docs(root: str) -> list[str]:
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  skip = {'site-packages', 'test', 'tests', 'idlelib'}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in skip)
    for name in sorted(filenames):
      if not name.endswith('.py'):
        continue
      try:
        with open(os.path.join(dirpath, name), encoding='utf-8') as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      for node in _definitions(tree):
        doc = ast.get_docstring(node)
        if doc and len(doc) >= 200:
          docs.append(doc)
  return docs


BUILTINS = {'python-docs': python_docs}


def read_builtin(spec: str) -> Records:
  name = spec[len(BUILTIN_PREFIX):]
  if name not in BUILTINS:
    raise DataError(f'unknown built-in corpus {spec!r}; choose one of '
                    f'{[BUILTIN_PREFIX + n for n in BUILTINS]}')
  docs = [{'text': d} for d in BUILTINS[name]() if d.strip()]
  return Records(spec, docs, lambda i: f'{spec}[{i}]')


def load(spec: str, *, text_split: str = 'paragraph', bad_records: str = 'fail',
         data_dir: str | None = None, streaming: bool = False) -> Records | Stream:
  """The records named by `spec` (files, globs, tfds:NAME[:SPLIT], hf:FOLDER_OR_NAME[:SPLIT] or
  builtin:NAME); with `streaming`, a Stream of them (hf: and local files only)."""
  if text_split not in TEXT_SPLITS:
    raise DataError(f'data.text_split={text_split!r}; choose one of {TEXT_SPLITS}')
  if bad_records not in BAD_RECORD_POLICIES:
    raise DataError(f'data.bad_records={bad_records!r}; choose one of {BAD_RECORD_POLICIES}')
  if streaming:
    return open_stream(spec, text_split=text_split)
  if spec.startswith(BUILTIN_PREFIX):
    return read_builtin(spec)
  if spec.startswith(TFDS_PREFIX):
    return read_tfds(spec, data_dir)
  if spec.startswith(HF_PREFIX):
    return read_hf(spec)
  return read_files(spec, text_split=text_split, bad_records=bad_records)

