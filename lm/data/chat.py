"""Conversations -> token ids and a loss mask, through named chat templates or a Jinja template.

A conversation is a list of {'role': 'system'|'user'|'assistant', 'content': str}. Alpaca records
and sharegpt conversations are converted to it first (`messages_from_alpaca`, `messages_from_chat`).

A template renders a conversation to spans of (text, trained, kind). Each span is tokenized on
its own and the ids concatenated, so the mask is exact: with `train_on='assistant'` the trained
tokens are each assistant message's content and the end-of-turn token that closes it (the model
must learn to stop), and nothing else. Message content is tokenized with special-token strings
treated as text, so a user message that quotes "<|im_end|>" cannot end its turn early.

Named templates: llama3, chatml (Qwen), gemma, mistral, plain. Their marker tokens map to the
tokenizer's own tokens when it has them; otherwise end-of-turn markers fall back to its EOS, the
start marker to its BOS, and the rest to plain text (a tokenizer trained by `lm` gets the
template's markers as single pieces). `jinja` templates (a tokenizer_config.json's
`chat_template`, as Hugging Face renders it) are split into spans by rendering each prefix of the
conversation; a template that is not prefix-stable is refused with a DataError.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from lm.data import templates
from lm.errors import DataError

ROLE_ALIASES = {'system': 'system', 'user': 'user', 'human': 'user', 'assistant': 'assistant',
                'gpt': 'assistant', 'model': 'assistant', 'bot': 'assistant'}
TRAIN_ON = ('assistant', 'last', 'all')


class EmptyContent(DataError):
  """A record whose text, prompt or answer is empty: skipped and counted, never fatal."""


@dataclasses.dataclass(frozen=True)
class Template:
  """A chat format given by strings: `prefix` + for each message header + content + footer + after.

  `header`, `footer` and `after` map a role to its text ('{role}' is replaced by the role's name
  in `roles`). An assistant message's footer is trained; `after` (a newline) is not.
  """
  name: str
  prefix: str
  header: dict
  footer: dict
  after: dict
  markers: dict  # marker string -> fallback when the tokenizer lacks it: 'bos' | 'eos' | 'text'
  roles: dict = dataclasses.field(default_factory=dict)
  merge_system: bool = False  # no system role: the system text opens the first user message

  def spans(self, messages, *, add_generation_prompt: bool = False):
    """[(text, answer_index or None, kind)]: kind 'template' (markers resolved) or 'content'."""
    messages = list(messages)
    if self.merge_system and messages and messages[0]['role'] == 'system':
      system = messages.pop(0)['content']
      if messages and messages[0]['role'] == 'user':
        messages[0] = {'role': 'user', 'content': system + '\n\n' + messages[0]['content']}
      else:
        messages.insert(0, {'role': 'user', 'content': system})
    out = [(self.prefix, None, 'template')]
    answer = 0
    for m in messages:
      role = m['role']
      name = self.roles.get(role, role)
      out.append((self.header[role].replace('{role}', name), None, 'template'))
      if role == 'assistant':
        out.append((m['content'], answer, 'content'))
        out.append((self.footer[role], answer, 'template'))
        answer += 1
      else:
        out.append((m['content'], None, 'content'))
        out.append((self.footer[role], None, 'template'))
      out.append((self.after.get(role, ''), None, 'template'))
    if add_generation_prompt:
      out.append((self.header['assistant'].replace('{role}', self.roles.get('assistant', 'assistant')),
                  None, 'template'))
    return [s for s in out if s[0]]


def _each(text):
  return {'system': text, 'user': text, 'assistant': text}


TEMPLATES = {
    'llama3': Template(
        'llama3', '<|begin_of_text|>', _each('<|start_header_id|>{role}<|end_header_id|>\n\n'),
        _each('<|eot_id|>'), {},
        {'<|begin_of_text|>': 'bos', '<|eot_id|>': 'eos', '<|start_header_id|>': 'text',
         '<|end_header_id|>': 'text'}),
    'chatml': Template(
        'chatml', '', _each('<|im_start|>{role}\n'), _each('<|im_end|>'), _each('\n'),
        {'<|im_end|>': 'eos', '<|im_start|>': 'text'}),
    'gemma': Template(
        'gemma', '<bos>', _each('<start_of_turn>{role}\n'), _each('<end_of_turn>'), _each('\n'),
        {'<bos>': 'bos', '<end_of_turn>': 'eos', '<start_of_turn>': 'text'},
        roles={'assistant': 'model'}, merge_system=True),
    'mistral': Template(
        'mistral', '<s>', {'user': '[INST] ', 'assistant': ''},
        {'user': ' [/INST]', 'assistant': '</s>'}, {},
        {'<s>': 'bos', '</s>': 'eos', '[INST]': 'text', '[/INST]': 'text'}, merge_system=True),
    'plain': Template(
        'plain', '<s>', {'system': '', 'user': 'User:', 'assistant': 'Assistant:'},
        {'system': '\n\n', 'user': '\n', 'assistant': '</s>'}, {'assistant': '\n'},
        {'<s>': 'bos', '</s>': 'eos'}),
}
TEMPLATES['qwen'] = TEMPLATES['chatml']


class JinjaTemplate:
  """A Hugging Face chat template (Jinja) with the tokenizer's bos/eos strings."""

  name = 'jinja'
  markers: dict = {}

  def __init__(self, source: str, bos_token: str = '', eos_token: str = ''):
    try:
      import jinja2  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DataError('Jinja chat templates need jinja2: pip install jinja2') from None

    def raise_exception(message):
      raise DataError(f'chat template refused the conversation: {message}')

    env = templates.environment(trim_blocks=True, lstrip_blocks=True)
    env.globals['raise_exception'] = raise_exception
    env.filters['tojson'] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise DataError(f'chat template does not parse: {e}') from None
    self.bos_token, self.eos_token = bos_token, eos_token

  def render(self, messages, add_generation_prompt=False) -> str:
    try:
      return self._template.render(messages=list(messages), bos_token=self.bos_token,
                                   eos_token=self.eos_token,
                                   add_generation_prompt=add_generation_prompt)
    except DataError:
      raise
    except templates.security_error() as e:
      raise DataError(f'the chat template reaches outside the conversation ({e}); templates are '
                      'rendered in a sandbox, so use a template that only reads messages') from None
    except Exception as e:  # pylint: disable=broad-except  # a template's own error is the data's
      raise DataError(f'the chat template failed on this conversation ({type(e).__name__}: '
                      f'{(str(e).splitlines() or [""])[0]})') from None

  def spans(self, messages, *, add_generation_prompt: bool = False):
    full = self.render(messages, add_generation_prompt)
    out, pos, answer = [], 0, 0
    for i, m in enumerate(messages):
      if m['role'] != 'assistant':
        continue
      before = self.render(messages[:i], True)
      upto = self.render(messages[:i + 1])
      if not (upto.startswith(before) and full.startswith(upto) and len(before) >= pos):
        raise DataError('the Jinja chat template renders earlier turns differently as the '
                        'conversation grows, so answer tokens cannot be located; use a named '
                        'template (data.chat_template=llama3|chatml|gemma|mistral|plain)')
      reply = upto[len(before):].rstrip()  # content and end marker, not the newline after it
      out.append((full[pos:len(before)], None, 'rendered'))
      out.append((reply, answer, 'rendered'))
      pos, answer = len(before) + len(reply), answer + 1
    out.append((full[pos:], None, 'rendered'))
    return [s for s in out if s[0]]


def get_template(name: str, tokenizer):
  """'auto' (the tokenizer's own Jinja template, else plain), a named template, 'tokenizer', or a
  path to a .jinja file or a tokenizer_config.json."""
  if name == 'auto':
    name = 'tokenizer' if getattr(tokenizer, 'chat_template', None) else 'plain'
  if name in TEMPLATES:
    return TEMPLATES[name]
  if name == 'tokenizer':
    source = getattr(tokenizer, 'chat_template', None)
    if not source:
      raise DataError('data.chat_template=tokenizer but the tokenizer has no chat template; '
                      f'choose one of {sorted(TEMPLATES)}')
  elif os.path.isfile(name):
    with open(name, encoding='utf-8') as f:
      source = f.read()
    if name.endswith('.json'):
      source = json.loads(source).get('chat_template')
      if not isinstance(source, str):
        raise DataError(f'{name} has no chat_template string')
  else:
    raise DataError(f'data.chat_template={name!r}: not a named template ({sorted(TEMPLATES)}), '
                    "'auto', 'tokenizer', or an existing .jinja / tokenizer_config.json file")
  bos = tokenizer.token_string(tokenizer.bos_id) if tokenizer.bos_id is not None else ''
  eos = tokenizer.token_string(tokenizer.eos_id) if tokenizer.eos_id is not None else ''
  return JinjaTemplate(source, bos, eos)


class _Content(str):
  """Message text (never edited by template spacing rules)."""


class ChatEncoder:
  """Template + tokenizer: conversations -> (ids, mask) with exact answer masks."""

  def __init__(self, template, tokenizer, train_on: str = 'assistant'):
    if train_on not in TRAIN_ON:
      raise DataError(f'data.train_on={train_on!r}; choose one of {TRAIN_ON}')
    self.template, self.tokenizer, self.train_on = template, tokenizer, train_on
    self._markers = {}  # marker string -> list of ids
    self._text_markers = set()  # markers the vocabulary lacks, kept as text
    for marker, fallback in template.markers.items():
      i = tokenizer.token_to_id(marker)
      if i is not None:
        self._markers[marker] = [i]
      elif fallback == 'bos':
        self._markers[marker] = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
      elif fallback == 'eos':
        self._markers[marker] = [tokenizer.eos_id]
      else:
        self._markers[marker] = tokenizer.encode(marker)
        self._text_markers.add(marker)
    self._marker_re = (re.compile('(' + '|'.join(map(re.escape, sorted(self._markers, key=len, reverse=True))) + ')')
                       if self._markers else None)
    self._cache = {}

  def _template_parts(self, text: str) -> list:
    """Template text as parts: str (text) or list of ids (a marker the vocabulary resolves)."""
    parts = self._cache.get(text)  # template text repeats: cache it
    if parts is None:
      parts = []
      for piece in self._marker_re.split(text) if self._marker_re else [text]:
        if piece in self._markers and piece not in self._text_markers:
          parts.append(self._markers[piece])
        elif piece:
          parts.append(piece)
      self._cache[text] = parts
    return parts

  def _encode_parts(self, parts: list) -> list[int]:
    """Adjacent text parts are tokenized as one string, so template text and the content beside it
    tokenize as the rendered string does (no lone SentencePiece "▁" between them). With a
    SentencePiece vocabulary, a template's space between a control token and text is the word
    boundary its dummy prefix already marks, so it is dropped: Mistral's `[INST] Hi [/INST]` with
    [INST] a control token becomes [INST] ▁Hi [/INST], as mistral-common tokenizes it."""
    sentencepiece = hasattr(self.tokenizer, 'sp')
    ids, text = [], ''
    for k, part in enumerate(parts):
      if not isinstance(part, str):
        if text:
          ids.extend(self.tokenizer.encode(text))
          text = ''
        ids.extend(part)
        continue
      if sentencepiece and not isinstance(part, _Content):
        if k > 0 and not isinstance(parts[k - 1], str) and part.startswith(' '):
          part = part[1:]
        if k + 1 < len(parts) and not isinstance(parts[k + 1], str) and part.endswith(' '):
          part = part[:-1]
      text += part
    if text:
      ids.extend(self.tokenizer.encode(text))
    return ids

  def encode_spans(self, spans, train_on=None):
    """-> (ids int32 [n], mask bool [n]); mask[i]: token i is a trained target.

    The untrained spans between answers are tokenized together (see _encode_parts); each answer
    starts a new string, so its content's ids are exactly the tokenizer's ids for that text (as
    mistral-common encodes answers; the only place a SentencePiece dummy prefix enters a turn)."""
    train_on = train_on or self.train_on
    n_answers = 1 + max((a for _, a, _ in spans if a is not None), default=-1)
    segments = []  # [answer, parts (None when already ids), ids]
    for text, answer, kind in spans:
      if kind == 'rendered':
        segments.append([answer, None, self.tokenizer.encode(text, specials=True)])
        continue
      parts = [_Content(text)] if kind == 'content' else self._template_parts(text)
      opens_answer = answer is not None and kind == 'content'
      if segments and segments[-1][1] is not None and segments[-1][0] == answer and not opens_answer:
        segments[-1][1].extend(parts)
      else:
        segments.append([answer, list(parts), None])
    ids, mask = [], []
    for answer, parts, encoded in segments:
      piece = encoded if parts is None else self._encode_parts(parts)
      if train_on == 'all':
        trained = True
      elif train_on == 'last':
        trained = answer is not None and answer == n_answers - 1
      else:
        trained = answer is not None
      ids.extend(piece)
      mask.extend([trained] * len(piece))
    ids, mask = np.asarray(ids, np.int32), np.asarray(mask, bool)
    if len(mask):
      mask[0] = False  # the first token is never a target
    return ids, mask

  def encode(self, messages):
    return self.encode_spans(self.template.spans(messages))

  def encode_prompt(self, messages) -> np.ndarray:
    """Ids of `messages` followed by the assistant header: what generation continues from."""
    return self.encode_spans(self.template.spans(messages, add_generation_prompt=True))[0]

  def stop_ids(self) -> list[int]:
    """Tokens that end an assistant turn (for generation)."""
    ends = [ids[-1] for m, ids in self._markers.items() if ids and self.template.markers.get(m) == 'eos']
    return sorted(set(ends + ([self.tokenizer.eos_id] if self.tokenizer.eos_id is not None else [])))


def special_tokens_for(template_name: str) -> list[str]:
  """Markers a tokenizer trained for this template should hold as single pieces."""
  template = TEMPLATES.get(template_name)
  if template is None:
    return []
  return [m for m, fallback in template.markers.items() if fallback != 'bos'
          and m not in ('<s>', '</s>')]


def _text(value, where, what):
  if isinstance(value, list):  # [{'type': 'text', 'text': ...}, ...] content parts
    value = ''.join(p.get('text', '') if isinstance(p, dict) else str(p) for p in value)
  if not isinstance(value, str):
    raise DataError(f'{where}: {what} is {type(value).__name__}, expected a string')
  return value


_SURROGATE = re.compile('[\ud800-\udfff]')


def check_unicode(value, where: str) -> None:
  """DataError for a string (in nested lists and dicts too) holding a lone surrogate: JSON's
  "\\ud800" escape decodes to one, it is not text, and tokenizers fail on it deep inside."""
  if isinstance(value, str):
    found = _SURROGATE.search(value)
    if found:
      raise DataError(f'{where}: the text holds a lone surrogate U+{ord(found.group()):04X} at '
                      f'character {found.start()}, which is not Unicode text (an unpaired \\u '
                      'escape in the JSON)')
  elif isinstance(value, dict):
    for v in value.values():
      check_unicode(v, where)
  elif isinstance(value, (list, tuple)):
    for v in value:
      check_unicode(v, where)


def check_order(messages: list[dict], where: str) -> None:
  """A conversation is an optional system message, then user and assistant turns alternating
  from a user turn: the shape every chat template renders (Gemma's and Mistral's refuse any
  other, and a system message in the middle has no place in most)."""
  turns = messages[1:] if messages and messages[0]['role'] == 'system' else messages
  for i, m in enumerate(turns):
    want = 'user' if i % 2 == 0 else 'assistant'
    if m['role'] != want:
      k = i + len(messages) - len(turns)
      after = f'after {turns[i - 1]["role"]}' if i else 'first'
      raise DataError(f'{where}: message {k} is {m["role"]} {after}; a conversation is an '
                      'optional system message, then user and assistant turns alternating from '
                      'user')


def normalize(raw, where: str = 'record') -> list[dict]:
  """[{role|from, content|value}, ...] -> [{'role', 'content'}], roles made canonical."""
  if not isinstance(raw, list) or not raw:
    raise DataError(f'{where}: expected a non-empty list of messages')
  out = []
  for i, m in enumerate(raw):
    if not isinstance(m, dict):
      raise DataError(f'{where}: message {i} is {type(m).__name__}, expected an object')
    role = m.get('role', m.get('from'))
    if role not in ROLE_ALIASES:
      raise DataError(f'{where}: message {i} has role {role!r}; expected one of {sorted(ROLE_ALIASES)}')
    content = m.get('content', m.get('value'))
    out.append({'role': ROLE_ALIASES[role], 'content': _text(content, where, f'message {i} content')})
  return out


def field(record, fields: dict, name: str, where: str, *, required: bool = True, default=None):
  column = fields.get(name, name)
  if column not in record or record[column] is None:
    if required:
      raise DataError(f'{where}: no field {column!r} (has {sorted(record)}); map it with '
                      f'data.fields="{name}=COLUMN"')
    return default
  return record[column]


def messages_from_alpaca(record, fields: dict, where: str = 'record') -> list[dict]:
  """{instruction, input, output[, system]} -> [system,] user, assistant."""
  instruction = _text(field(record, fields, 'instruction', where), where, 'instruction')
  extra = _text(field(record, fields, 'input', where, required=False, default=''), where, 'input')
  output = _text(field(record, fields, 'output', where), where, 'output')
  system = field(record, fields, 'system', where, required=False, default='')
  user = instruction + ('\n\n' + extra if extra.strip() else '')
  if not user.strip() or not output.strip():
    raise EmptyContent(f'{where}: empty instruction or output')
  messages = [{'role': 'system', 'content': _text(system, where, 'system')}] if system else []
  return messages + [{'role': 'user', 'content': user}, {'role': 'assistant', 'content': output}]


def messages_from_chat(record, fields: dict, where: str = 'record') -> list[dict]:
  """{messages: [{role, content}]} or sharegpt {conversations: [{from, value}], system?}."""
  if 'messages' in fields or 'messages' in record:
    raw = field(record, fields, 'messages', where)
  elif 'conversations' in record:
    raw = record['conversations']
  else:
    raise DataError(f'{where}: no "messages" or "conversations" field (has {sorted(record)}); map '
                    'it with data.fields="messages=COLUMN"')
  messages = normalize(raw, where)
  system = record.get(fields.get('system', 'system'))
  if isinstance(system, str) and system and messages[0]['role'] != 'system':
    messages.insert(0, {'role': 'system', 'content': system})
  check_order(messages, where)
  if not any(m['role'] == 'assistant' and m['content'].strip() for m in messages):
    raise EmptyContent(f'{where}: the conversation has no assistant reply to train on')
  return messages
