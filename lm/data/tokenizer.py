"""Tokenizers: SentencePiece `.model` files and Hugging Face `tokenizer.json`, behind one interface.

Both classes offer `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `encode`, `encode_batch`, `decode`,
`token_to_id`, `token_string` and `is_special`. Special tokens are never added implicitly: `encode` returns the
text's ids and adds BOS/EOS only when asked, and special-token strings inside the text ("</s>",
"<|im_end|>") stay plain text unless `specials=True` (used for rendered chat templates only, so a
document that quotes a marker cannot inject one).

`bos_id` may be None (Qwen tokenizers define no BOS), and `add_bos` says whether the tokenizer's
own settings start a sequence with it: tokenizer_config.json's `add_bos_token`, else what the
tokenizer.json's post-processor adds; a GGUF file's `tokenizer.ggml.add_bos_token`, else llama.cpp's
default for its vocabulary (SentencePiece: yes; byte-level BPE: only the Llama-3 pre-tokenizers).
Everything that starts a sequence (training text, prompts, scored contexts) asks `add_bos`, so
SmolLM2, whose GGUF says false, is never given a BOS it was not trained with. `pad_id` is the
tokenizer's pad token, else 0. Padding never reaches the loss (its weight and segment id are 0), so the pad id only needs to be
a valid index.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import sentencepiece as spm

from lm.errors import DataError


class Tokenizer:
  """A SentencePiece model (`.model`, also MaxText's `tokenizer.default`)."""

  chat_template = None  # SentencePiece files carry no chat template
  gguf_fields = None  # the tokenizer.* metadata when it came from a GGUF file
  bos_setting = None  # a GGUF file's add_bos_token (None: SentencePiece's default, add BOS)

  def __init__(self, path: str, *, proto: bytes | None = None):
    self.path = path
    self.sp = spm.SentencePieceProcessor()
    if proto is not None:
      self.sp.LoadFromSerializedProto(proto)
    else:
      if not os.path.isfile(path):
        raise DataError(f'tokenizer {path!r} not found; pass a SentencePiece .model or tokenizer.json, '
                        'or leave data.tokenizer unset to train one')
      try:
        self.sp.Load(path)
      except (OSError, RuntimeError) as e:
        raise DataError(f'tokenizer {path!r} is not a SentencePiece model ({e}); '
                        'Hugging Face tokenizers are loaded from tokenizer.json') from None
    # Control pieces (<s>, </s>, ...) are never produced by SentencePiece from text; rendered chat
    # templates name them as strings, so `encode(..., specials=True)` splits them out first.
    self._controls = {self.sp.IdToPiece(i): i for i in range(self.sp.GetPieceSize())
                      if self.sp.IsControl(i)}
    self._control_re = (re.compile('(' + '|'.join(map(re.escape, sorted(self._controls, key=len,
                                                                          reverse=True))) + ')')
                        if self._controls else None)

  @classmethod
  def from_proto(cls, proto: bytes, path: str, config: dict) -> 'Tokenizer':
    """A SentencePiece model given as a serialized proto (a GGUF file's 'llama' vocabulary)."""
    tok = cls(path, proto=proto)
    tok.chat_template = config.get('chat_template')
    return tok

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  @property
  def bos_id(self) -> int | None:
    return self.sp.bos_id() if self.sp.bos_id() >= 0 else None

  @property
  def eos_id(self) -> int | None:
    return self.sp.eos_id() if self.sp.eos_id() >= 0 else None

  @property
  def add_bos(self) -> bool:
    return self.bos_id is not None and self.bos_setting is not False

  @property
  def pad_id(self) -> int:
    # Many models (Llama-2) define no pad piece; padding is masked by weights anyway.
    return max(self.sp.pad_id(), 0)

  def token_to_id(self, token: str) -> int | None:
    """The id of `token` if it is one piece of this vocabulary, else None."""
    i = self.sp.PieceToId(token)
    return i if self.sp.IdToPiece(i) == token and not self.sp.IsUnknown(i) else None

  def token_string(self, i: int) -> str:
    return self.sp.IdToPiece(int(i))

  def is_special(self, i: int) -> bool:
    return bool(self.sp.IsControl(int(i)))

  def encode(self, text: str, *, bos: bool = False, eos: bool = False,
             specials: bool = False) -> list[int]:
    _unicode(text)
    if specials and self._control_re is not None:
      ids = []
      for part in self._control_re.split(text):
        if part in self._controls:
          ids.append(self._controls[part])
        elif part:
          ids.extend(self.sp.EncodeAsIds(part))
    else:
      ids = self.sp.EncodeAsIds(text)
    return _wrap(ids, self.bos_id if bos else None, self.eos_id if eos else None)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.sp.EncodeAsIds(list(texts))

  def decode(self, ids) -> str:
    return self.sp.DecodeIds([int(i) for i in ids])


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (Llama-3, Qwen, Mistral, ...) through the `tokenizers` package.

  BOS/EOS/pad and the chat template come from `tokenizer_config.json` next to it when present.
  """

  gguf_fields = None  # the tokenizer.* metadata when it came from a GGUF file

  def __init__(self, path: str, *, spec: str | None = None, config: dict | None = None):
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if spec is None and not os.path.isfile(file):
      raise DataError(f'tokenizer {path!r} not found; pass a tokenizer.json or the folder holding it')
    import tokenizers  # pylint: disable=import-outside-toplevel
    self.path = file
    try:
      spec = spec if spec is not None else open(file, encoding='utf-8').read()  # pylint: disable=consider-using-with
      self.tok = tokenizers.Tokenizer.from_str(spec)
      # A second instance that treats special-token strings as text, for documents.
      self.plain = tokenizers.Tokenizer.from_str(spec)
    except Exception as e:  # the Rust side raises a bare Exception
      raise DataError(f'{file} is not a Hugging Face tokenizer.json ({str(e)[:200]})') from None
    self.plain.encode_special_tokens = True
    self._special_ids = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
    self.config = config or {}
    config_file = os.path.join(os.path.dirname(file), 'tokenizer_config.json')
    if config is None and os.path.isfile(config_file):
      with open(config_file, encoding='utf-8') as f:
        self.config = json.load(f)
    self.bos_id = self._config_token('bos_token')
    self.eos_id = self._config_token('eos_token')
    setting = self.config.get('add_bos_token')
    if not isinstance(setting, bool):  # no explicit setting: what the post-processor does
      setting = self.bos_id is not None and self.tok.encode(
          'a', add_special_tokens=True).ids[:1] == [self.bos_id]
    self.add_bos = self.bos_id is not None and setting
    if self.eos_id is None:
      self.eos_id = next((self.tok.token_to_id(t) for t in _EOS_GUESSES
                          if self.tok.token_to_id(t) is not None), None)
    pad = self._config_token('pad_token')
    self.pad_id = 0 if pad is None else pad
    template = self.config.get('chat_template')
    if isinstance(template, list):  # [{name, template}, ...]: take the default one
      template = next((t['template'] for t in template if t.get('name') == 'default'), None)
    self.chat_template = template

  @classmethod
  def from_json(cls, spec: str, config: dict, path: str) -> 'HFTokenizer':
    """A tokenizer.json given as a string, with tokenizer_config.json's fields in `config`."""
    return cls(path, spec=spec, config=config)

  def _config_token(self, key: str) -> int | None:
    value = self.config.get(key)
    if isinstance(value, dict):  # {"content": "<s>", ...} in older configs
      value = value.get('content')
    return self.tok.token_to_id(value) if isinstance(value, str) else None

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def token_to_id(self, token: str) -> int | None:
    return self.tok.token_to_id(token)

  def token_string(self, i: int) -> str:
    return self.tok.id_to_token(int(i))

  def is_special(self, i: int) -> bool:
    return int(i) in self._special_ids

  def encode(self, text: str, *, bos: bool = False, eos: bool = False,
             specials: bool = False) -> list[int]:
    _unicode(text)
    tok = self.tok if specials else self.plain
    ids = tok.encode(text, add_special_tokens=False).ids
    return _wrap(ids, self.bos_id if bos else None, self.eos_id if eos else None)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.plain.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


_EOS_GUESSES = ('<|endoftext|>', '<|end_of_text|>', '</s>', '<eos>')


_SURROGATE = re.compile('[\ud800-\udfff]')


def _unicode(text: str) -> str:
  """`text`, or DataError where it holds a lone surrogate: not text (bytes that were not UTF-8 on
  the command line decode to them, as does JSON's unpaired "\\ud800"); tokenizers fail on it."""
  found = _SURROGATE.search(text) if isinstance(text, str) else None
  if found:
    raise DataError(f'text {text[max(0, found.start() - 20):found.start() + 20]!r} holds a lone '
                    f'surrogate U+{ord(found.group()):04X} at character {found.start()}, which is not '
                    'Unicode text (bytes that are not UTF-8, or an unpaired \\u escape); give UTF-8 text')
  return text


def _wrap(ids, bos, eos):
  ids = list(ids)
  if bos is not None:
    ids.insert(0, bos)
  if eos is not None:
    ids.append(eos)
  return ids


def load(path: str):
  """A tokenizer from a SentencePiece model file, a tiktoken rank file (Llama 3's tokenizer.model),
  a tokenizer.json, a folder holding one, or a llama.cpp GGUF file (its embedded vocabulary)."""
  if path.endswith('.gguf'):
    return _from_gguf(path)
  if os.path.isdir(path) or path.endswith('.json'):
    return HFTokenizer(path)
  if path.endswith('.tiktoken') or is_tiktoken_file(path):
    return TiktokenTokenizer(path)
  return Tokenizer(path)


def _from_gguf(path: str):
  """The tokenizer a llama.cpp GGUF file embeds (lm/data/gguf_tokenizer.py reads it)."""
  from lm.data import gguf_tokenizer  # pylint: disable=import-outside-toplevel
  kind, definition, config, fields = gguf_tokenizer.spec(path)
  if kind == 'gpt2':
    tok = HFTokenizer.from_json(definition, config, path)
    tok.add_bos = tok.bos_id is not None and gguf_tokenizer.adds_bos(fields)
  else:
    tok = Tokenizer.from_proto(definition, path, config)
    tok.bos_setting = gguf_tokenizer.adds_bos(fields)
  tok.gguf_fields = fields
  return tok


_TIKTOKEN_LINE = re.compile(rb'^[A-Za-z0-9+/]+=* \d+$')


def is_tiktoken_file(path: str) -> bool:
  """Whether `path` is a tiktoken rank file: lines of a base64 token, a space and its rank."""
  if not os.path.isfile(path):
    return False
  with open(path, 'rb') as f:
    head = f.read(4096).split(b'\n')
  lines = [line for line in head[:-1] if line] or [l for l in head if l]
  return bool(lines) and all(_TIKTOKEN_LINE.match(line) for line in lines[:20])


# Llama 3's split regex and its 256 special tokens after the 128,000 ranked ones (from Meta's
# tokenizer.py, which tokenizer.model files come with).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = (['<|begin_of_text|>', '<|end_of_text|>', '<|reserved_special_token_0|>',
                    '<|reserved_special_token_1|>', '<|finetune_right_pad_id|>', '<|step_id|>',
                    '<|start_header_id|>', '<|end_header_id|>', '<|eom_id|>', '<|eot_id|>',
                    '<|python_tag|>']
                   + [f'<|reserved_special_token_{i}|>' for i in range(2, 247)])


class TiktokenTokenizer:
  """A tiktoken rank file (the Llama 3 `tokenizer.model` format) through the `tiktoken` package.

  The file holds only the ranked byte sequences; the split regex and the special tokens after
  them are Llama 3's (<|begin_of_text|> = 128000, <|eot_id|> = 128009, ...), which is what such
  files are shipped for.
  """

  chat_template = None
  gguf_fields = None

  def __init__(self, path: str):
    try:
      import tiktoken  # pylint: disable=import-outside-toplevel
      from tiktoken.load import load_tiktoken_bpe  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DataError('tiktoken rank files need the tiktoken package: pip install tiktoken') from None
    if not os.path.isfile(path):
      raise DataError(f'tokenizer {path!r} not found; pass a tiktoken rank file (Llama 3\'s '
                      'tokenizer.model), a SentencePiece .model or a tokenizer.json')
    self.path = path
    try:
      ranks = load_tiktoken_bpe(path)
    except Exception as e:  # pylint: disable=broad-except
      raise DataError(f'{path} is not a tiktoken rank file ({str(e)[:200]})') from None
    self._specials = {t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIALS)}
    self.enc = tiktoken.Encoding(name=os.path.basename(path), pat_str=LLAMA3_PATTERN,
                                 mergeable_ranks=ranks, special_tokens=self._specials)
    self._strings = {i: t for t, i in self._specials.items()}
    self.bos_id = self._specials['<|begin_of_text|>']
    self.eos_id = self._specials['<|end_of_text|>']
    self.pad_id = self._specials['<|finetune_right_pad_id|>']
    self.add_bos = True  # Meta's tokenizer.py starts every dialog and prompt with <|begin_of_text|>

  @property
  def vocab_size(self) -> int:
    return self.enc.n_vocab

  def token_to_id(self, token: str) -> int | None:
    if token in self._specials:
      return self._specials[token]
    try:
      return self.enc.encode_single_token(token)
    except KeyError:
      return None

  def token_string(self, i: int) -> str:
    i = int(i)
    if i in self._strings:
      return self._strings[i]
    return self.enc.decode_single_token_bytes(i).decode('utf-8', errors='replace')

  def is_special(self, i: int) -> bool:
    return int(i) in self._strings

  def encode(self, text: str, *, bos: bool = False, eos: bool = False,
             specials: bool = False) -> list[int]:
    _unicode(text)
    ids = self.enc.encode(text, allowed_special='all' if specials else set(), disallowed_special=())
    return _wrap(ids, self.bos_id if bos else None, self.eos_id if eos else None)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return self.enc.encode_ordinary_batch(list(texts))

  def decode(self, ids) -> str:
    return self.enc.decode([int(i) for i in ids])


def train_tokenizer(docs, path: str, vocab_size: int, model_type: str = 'bpe', seed: int = 0,
                    special_tokens=(), byte_fallback: bool = True) -> Tokenizer:
  """Trains a SentencePiece model on `docs` and writes it atomically to `path`.

  Ids 0-3 are pad, unk, bos, eos; `special_tokens` (chat markers such as "<|im_end|>") become
  single pieces that text containing them always encodes to. decode(encode(text)) == text for any
  text: no normalisation (SentencePiece's default NFKC rewrites characters and its whitespace
  handling collapses runs of spaces and newlines, which loses code layout), whitespace-only pieces
  (indentation, blank lines) allowed, and byte fallback spells any character outside the
  vocabulary as UTF-8 bytes instead of <unk>. Training sees documents in chunks of whole lines
  with their newlines, so newlines and indentation get pieces of their own.
  """
  del seed  # SentencePiece's trainer has no seed; its sampling is deterministic for fixed input
  if model_type not in ('bpe', 'unigram'):
    raise DataError(f'data.tokenizer_model_type={model_type!r}; choose bpe or unigram')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    prefix = os.path.join(tmp, 'sp')
    try:
      spm.SentencePieceTrainer.Train(
          sentence_iterator=_chunks(docs), model_prefix=prefix, vocab_size=vocab_size,
          model_type=model_type, byte_fallback=byte_fallback, character_coverage=0.9995,
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True, max_sentence_length=_CHUNK_BYTES * 2,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, split_digits=True,
          **({'user_defined_symbols': list(special_tokens)} if special_tokens else {}),
          input_sentence_size=2_000_000, shuffle_input_sentence=True,
          num_threads=os.cpu_count() or 1, minloglevel=2)
    except RuntimeError as e:
      raise DataError(f'tokenizer training failed: {e}; try a smaller data.tokenizer_vocab_size') from None
    os.replace(prefix + '.model', path)
  return Tokenizer(path)


_CHUNK_BYTES = 2048  # SentencePiece skips longer training sentences


def _chunks(docs):
  """Each document as runs of whole lines (newlines kept) of at most _CHUNK_BYTES bytes; a longer
  line is cut."""
  for doc in docs:
    chunk, size = [], 0
    for line in doc.splitlines(keepends=True):
      n = len(line.encode('utf-8'))
      if chunk and size + n > _CHUNK_BYTES:
        yield ''.join(chunk)
        chunk, size = [], 0
      while n > _CHUNK_BYTES:
        head = line.encode('utf-8')[:_CHUNK_BYTES].decode('utf-8', errors='ignore')
        yield head
        line = line[len(head):]
        n = len(line.encode('utf-8'))
      chunk.append(line)
      size += n
    if ''.join(chunk).strip():
      yield ''.join(chunk)
