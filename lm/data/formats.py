"""Records -> token items, per data format, with the truncation policy.

An item is (ids int32 [n], mask bool [n]) where mask[i] says token i is a trained target; a
preference item is a pair of them. `Encoder(record)` returns (items, note): note is None,
'truncated', or why the record gave no items (counted and reported, never silent).

Formats:
  text        a document: [BOS] text [EOS], every token trained
  alpaca      {instruction, input, output[, system]} as one user/assistant exchange
  chat        {messages: [{role, content}]} or sharegpt {conversations: [{from, value}]}
  preference  chosen/rejected pairs (see preference.py)
  kto         {prompt, completion, label} unpaired examples (or pairs, read as two); the label
              is the sign of the weights

Truncation (`data.truncate`) of an example longer than seq_len + 1 tokens:
  prompt  drop tokens from the start of the prompt (after BOS), keeping the last answer whole;
          an example whose answer alone does not fit is skipped and counted
  skip    skip and count every example that does not fit
  fail    raise a DataError
Text documents are never truncated: stream packing splits them across rows, and the other
packings cut them into seq_len + 1 pieces.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm.data import chat, preference
from lm.errors import DataError

FORMATS = ('text', 'alpaca', 'chat', 'preference', 'kto')
TRUNCATE = ('prompt', 'skip', 'fail')
SKIP_EMPTY = 'empty documents'
SKIP_TOO_LONG = 'examples longer than seq_len'
SKIP_ANSWER_TOO_LONG = 'answers longer than seq_len'


def parse_fields(spec) -> dict:
  """'instruction=question,output=answer' (or a dict) -> {'instruction': 'question', ...}."""
  if isinstance(spec, dict) or hasattr(spec, 'items'):
    return dict(spec.items())
  out = {}
  for part in (p.strip() for p in (spec or '').split(',') if p.strip()):
    name, eq, column = part.partition('=')
    if not eq or not name.strip() or not column.strip():
      raise DataError(f'data.fields entry {part!r}; write NAME=COLUMN, e.g. "output=answer"')
    out[name.strip()] = column.strip()
  return out


@dataclasses.dataclass
class Encoder:
  """Turns one source's records into items for a sequence length."""
  format: str
  tokenizer: object
  seq_len: int
  fields: dict = dataclasses.field(default_factory=dict)
  text_field: str = 'text'
  chat_template: str = 'auto'
  train_on: str = 'assistant'
  truncate: str = 'prompt'
  chunk_text: bool = False  # cut long text documents into seq_len + 1 pieces (non-stream packing)
  bad_records: str = 'fail'  # a malformed record met while training: fail | skip

  def __post_init__(self):
    if self.format not in FORMATS:
      raise DataError(f'data.format={self.format!r}; choose one of {FORMATS}')
    if self.truncate not in TRUNCATE:
      raise DataError(f'data.truncate={self.truncate!r}; choose one of {TRUNCATE}')
    self.chat = None
    if self.format != 'text' and self.tokenizer is not None:  # no tokenizer: parsing only
      self.chat = chat.ChatEncoder(chat.get_template(self.chat_template, self.tokenizer),
                                   self.tokenizer, self.train_on)
    self.limit = self.seq_len + 1  # a row of seq_len positions holds seq_len + 1 tokens
    self.labels_seen = set()  # kto: the label classes check() met (check_labels reads them)

  # -- structure, without tokenizing --------------------------------------------------------------

  def parse(self, record, where: str = 'record'):
    """The record's content: text, messages, or (prompt, chosen, rejected). Raises DataError."""
    if not isinstance(record, dict):
      raise DataError(f'{where}: expected a record (object), got {type(record).__name__}')
    chat.check_unicode(record, where)
    if self.format == 'text':
      column = self.fields.get('text', self.text_field)
      value = record.get(column)
      if value is None and list(record) == ['text']:
        value = record['text']
      if not isinstance(value, str):
        raise DataError(f'{where}: no string field {column!r} (has {sorted(record)}); set '
                        'data.text_field or data.fields="text=COLUMN"')
      return value
    if self.format == 'alpaca':
      return chat.messages_from_alpaca(record, self.fields, where)
    if self.format == 'chat':
      return chat.messages_from_chat(record, self.fields, where)
    if self.format == 'kto':
      return preference.labelled_from_record(record, self.fields, where)
    return preference.from_record(record, self.fields, where)

  def check(self, record):
    """None if the record parses, else (reason, fatal): a malformed record is fatal under
    data.bad_records=fail; an empty one is always just skipped and counted."""
    try:
      content = self.parse(record, 'record')
    except chat.EmptyContent as e:
      return str(e).removeprefix('record: '), False
    except DataError as e:
      return str(e).removeprefix('record: '), True
    if self.format == 'text' and not content.strip():
      return SKIP_EMPTY, False
    if self.format == 'kto':
      self.labels_seen.update(desirable for _, _, desirable in content)
    return None

  def text_of(self, record) -> str:
    """Plain text of a record, for training a tokenizer."""
    content = self.parse(record)
    if self.format == 'text':
      return content
    if self.format == 'preference':
      prompt, chosen, rejected = content
      return '\n'.join([m['content'] for m in prompt] + [chosen, rejected])
    if self.format == 'kto':
      return '\n'.join([m['content'] for m in content[0][0]] + [c for _, c, _ in content])
    return '\n'.join(m['content'] for m in content)

  # -- tokens -------------------------------------------------------------------------------------

  def __call__(self, record):
    try:
      content = self.parse(record)
    except chat.EmptyContent:
      return [], SKIP_EMPTY
    except DataError as e:  # in-memory sources were checked at load; this is a lazy (TFDS) one
      if self.bad_records == 'fail':
        raise DataError(f'{e} (record starts {str(record)[:80]!r}); fix the data or set '
                        'data.bad_records=skip') from None
      return [], 'bad records'
    if self.format == 'text':
      return self._text(content)
    if self.format == 'preference':
      prompt, chosen, rejected = content
      return self._pair(record, *preference.encode(self.chat, prompt, chosen, rejected))
    if self.format == 'kto':
      out, notes = [], []
      for prompt, completion, desirable in content:
        items, note = self._fit(record, *preference.encode_labelled(self.chat, prompt, completion))
        out += [(ids, mask.astype(np.float32) * (1.0 if desirable else -1.0)) for ids, mask in items]
        notes.append(note)
      return out, next((n for n in notes if n), None)
    ids, mask = self.chat.encode(content)
    return self._fit(record, ids, mask)

  def _text(self, text):
    if not text.strip():
      return [], SKIP_EMPTY
    ids = np.asarray(self.tokenizer.encode(text, bos=self.tokenizer.add_bos,
                                           eos=True), np.int32)
    mask = np.ones(len(ids), bool)
    mask[0] = False
    if not self.chunk_text or len(ids) <= self.limit:
      return [(ids, mask)], None
    step = self.seq_len  # pieces overlap by one token so every target is kept
    return [(ids[s:s + self.limit], np.concatenate([[False], mask[s + 1:s + self.limit]]))
            for s in range(0, len(ids) - 1, step)], None

  def _too_long(self, record, n):
    if self.truncate == 'fail':
      raise DataError(f'an example of {n} tokens is longer than data.seq_len + 1 = {self.limit} '
                      f'(record starts {str(record)[:80]!r}); raise data.seq_len or set '
                      'data.truncate=prompt or skip')
    return [], SKIP_TOO_LONG

  def _fit(self, record, ids, mask):
    n = len(ids)
    if not mask.any():
      return [], 'examples with nothing to train on'
    if n <= self.limit:
      return [(ids, mask)], None
    if self.truncate != 'prompt':
      return self._too_long(record, n)
    trained = np.flatnonzero(mask)
    start = trained[-1]
    while start > 0 and mask[start - 1]:
      start -= 1  # first token of the last answer
    cut = _prompt_cut(ids, start, n - self.limit, self.tokenizer.bos_id)
    if cut is None:
      return [], SKIP_ANSWER_TOO_LONG
    return [(_drop(ids, cut), _drop(mask, cut))], 'truncated'

  def _pair(self, record, chosen, rejected):
    (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
    n = max(len(c_ids), len(r_ids))
    if n <= self.limit:
      return [(chosen, rejected)], None
    if self.truncate != 'prompt':
      return self._too_long(record, n)
    start = int(np.argmax(c_mask))  # the reply starts at the first trained token in both
    cut = _prompt_cut(c_ids, start, n - self.limit, self.tokenizer.bos_id)
    if cut is None:
      return [], SKIP_ANSWER_TOO_LONG
    return [((_drop(c_ids, cut), _drop(c_mask, cut)), (_drop(r_ids, cut), _drop(r_mask, cut)))], 'truncated'


def check_labels(encoders, what: str) -> None:
  """KTO needs desirable and undesirable examples: with one class its reference point has nothing
  to compare against and the loss only pushes every completion one way. The classes are those
  the up-front record check met (sources read lazily, e.g. TFDS, are not counted)."""
  kto = [e for e in encoders if e.format == 'kto']
  seen = set().union(*(e.labels_seen for e in kto)) if kto else set()
  if len(seen) == 1:
    have, lack = ('desirable', 'undesirable') if True in seen else ('undesirable', 'desirable')
    raise DataError(f'{what}: every KTO example is {have} (label {str(True in seen).lower()}); KTO '
                    f'needs {lack} examples too: add them, or use data.format=preference pairs')


def _prompt_cut(ids, answer_start, excess, bos_id):
  """(first, last) token range to drop so `excess` tokens go, taken after BOS and before the
  answer, keeping at least one token before the answer; None if that cannot be done."""
  first = 1 if bos_id is not None and len(ids) and ids[0] == bos_id else 0
  last = first + excess
  if last > answer_start or first + answer_start - last < 1:
    return None
  return first, last


def _drop(a, cut):
  first, last = cut
  out = np.concatenate([a[:first], a[last:]])
  if out.dtype == bool and len(out):
    out[0] = False
  return out
