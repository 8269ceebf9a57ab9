"""The tokenizer a llama.cpp GGUF file embeds, as an lm tokenizer; and an lm tokenizer as GGUF fields.

GGUF stores the vocabulary as `tokenizer.*` metadata, not as a tokenizer file:

- `tokenizer.ggml.model = 'gpt2'`: byte-level BPE (SmolLM2, Llama 3, Qwen2). Tokens, merges and
  token types become a `tokenizers` BPE model; the pre-tokenizer comes from `tokenizer.ggml.pre`,
  the name llama.cpp gives each family's split regex (the ones lm knows are in `PRE_TOKENIZERS`).
- `tokenizer.ggml.model = 'llama'`: SentencePiece (Llama 2, Mistral). Tokens, scores and token
  types become a SentencePiece model proto, loaded by sentencepiece itself.

Control tokens (type 3) are special tokens; `tokenizer.chat_template`, bos and eos ids come along.
`fields_for` is the inverse, for `lm export --format gguf`.
"""

from __future__ import annotations

import json
import os

from lm.errors import DataError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # gguf.TokenType

_GPT2_WORDS = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_WORDS = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# o200k_base's split (GPT-4o; Phi-4-mini and others ship it): cased words keep their contraction.
_GPT4O_WORDS = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
                r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> the regexes llama.cpp splits text with, in order (llama-vocab.cpp).
PRE_TOKENIZERS = {
    'default': [_GPT2_WORDS], 'gpt2': [_GPT2_WORDS],
    'smollm': [r'\p{N}', _GPT2_WORDS], 'starcoder': [r'\p{N}', _GPT2_WORDS],
    'llama-bpe': [_LLAMA3_WORDS], 'llama3': [_LLAMA3_WORDS],
    'qwen2': [_QWEN2_WORDS], 'gpt-4o': [_GPT4O_WORDS],
}
# What export tries, in order: one name per distinct split (aliases above are for reading).
EXPORT_PRE = ('llama-bpe', 'qwen2', 'smollm', 'gpt-4o', 'default')
# Strings that tell the splits apart: contractions in both cases, digit runs, newlines, runs of
# spaces, punctuation, accents, code. An exported vocabulary must tokenize each exactly as the
# model's own tokenizer does, or export refuses it.
PROBES = ("don't I'll we'RE DON'T You've", '12345 2024 3.14159 1,000,000', 'a\n\nb\r\nc\n',
          'a  b   c    d', 'hello!!! world... (x)=[y]; {z}/w', 'naïve café Ωmega ÅNGSTRÖM',
          'def f(x):\n    return x ** 2  # squared\n', 'abc123def XMLHttpRequest iPhone',
          '  leading and trailing  ', 'tab\tseparated\tvalues', 'über-straße ǅemal',
          'Hello World HELLO world hELLO')


# The byte-level BPE pre-tokenizers llama.cpp starts a sequence with BOS for when the file does not
# say (llama-vocab.cpp: the LLAMA3 group sets add_bos); every other BPE vocabulary does not.
LLAMA3_GROUP = ('llama3', 'llama-v3', 'llama-bpe', 'falcon3', 'falcon-h1', 'pixtral', 'midm-2.0',
                'lfm2')


def adds_bos(fields: dict) -> bool:
  """Whether llama.cpp starts a sequence with BOS for this file: `tokenizer.ggml.add_bos_token`
  when present, else its default (SentencePiece 'llama' vocabularies yes, BPE only LLAMA3_GROUP)."""
  explicit = fields.get('tokenizer.ggml.add_bos_token')
  if explicit is not None:
    return bool(explicit)
  if fields.get('tokenizer.ggml.model') == 'gpt2':
    return fields.get('tokenizer.ggml.pre', 'default') in LLAMA3_GROUP
  return True


def reader(path: str, error: type[Exception] = DataError):
  """The file's parsed header (memory mapped). Parsing a 50k-token vocabulary takes seconds, and
  the tokenizer, the model config and the weights (lm/io/gguf.py) each need it, so the last file's
  reader is kept, keyed by path, modification time and size. A file that is not GGUF raises
  `error`."""
  import gguf  # pylint: disable=import-outside-toplevel
  try:
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
    if _last_reader and _last_reader[0] == key:
      return _last_reader[1]
    parsed = gguf.GGUFReader(path)
  except Exception as e:  # pylint: disable=broad-except  # a truncated or foreign file
    raise error(f'{path} is not a readable GGUF file ({str(e)[:200]})') from None
  _last_reader[:] = [key, parsed]
  return parsed


_last_reader: list = []


def read_fields(path: str) -> dict:
  """{key: value} of a GGUF file's metadata (tensors are not read)."""
  return fields_of(reader(path))


def fields_of(reader) -> dict:
  """{key: value} of a gguf.GGUFReader's metadata."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith('GGUF.'):
      continue
    out[key] = field.contents()
  return out


def spec(path: str, fields: dict | None = None) -> tuple[str, object, dict, dict]:
  """(kind, definition, config, fields) of the tokenizer embedded in GGUF file `path`: kind
  'gpt2' with a tokenizer.json string, or 'llama' with a SentencePiece model proto; config holds
  tokenizer_config.json's fields (special token strings, chat template). lm.data.tokenizer.load
  builds the tokenizer from it."""
  fields = read_fields(path) if fields is None else fields
  model = fields.get('tokenizer.ggml.model')
  if 'tokenizer.ggml.tokens' not in fields:
    raise DataError(f'{path} embeds no tokenizer (no tokenizer.ggml.tokens); set data.tokenizer')
  config = {'chat_template': fields.get('tokenizer.chat_template')}
  tokens = list(fields['tokenizer.ggml.tokens'])
  for key in ('bos', 'eos', 'padding', 'unknown'):
    i = fields.get(f'tokenizer.ggml.{key}_token_id')
    if i is not None and 0 <= int(i) < len(tokens):
      config[{'padding': 'pad_token', 'unknown': 'unk_token'}.get(key, f'{key}_token')] = tokens[int(i)]
  own = {k: v for k, v in fields.items() if k.startswith('tokenizer.')}
  if model == 'gpt2':
    return 'gpt2', _bpe_json(path, fields), config, own
  if model == 'llama':
    return 'llama', _sentencepiece_proto(fields), config, own
  raise DataError(f'{path}: tokenizer.ggml.model={model!r} is not supported; lm reads gpt2 (byte-level '
                  'BPE) and llama (SentencePiece) GGUF tokenizers; set data.tokenizer to the '
                  "model's tokenizer.json")


def _bpe_json(path: str, fields: dict) -> str:
  pre = fields.get('tokenizer.ggml.pre', 'default')
  if pre not in PRE_TOKENIZERS:
    raise DataError(f'{path}: tokenizer.ggml.pre={pre!r} (the split regex) is not one lm knows '
                    f'({", ".join(sorted(PRE_TOKENIZERS))}); set data.tokenizer to the model\'s '
                    'tokenizer.json')
  tokens = list(fields['tokenizer.ggml.tokens'])
  types = list(fields.get('tokenizer.ggml.token_type') or [NORMAL] * len(tokens))
  merges = list(fields.get('tokenizer.ggml.merges') or [])
  regexes = PRE_TOKENIZERS[pre]
  splits = [{'type': 'Split', 'pattern': {'Regex': r}, 'behavior': 'Isolated', 'invert': False}
            for r in regexes]
  byte_level = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False,
                'use_regex': False}
  added = [{'id': i, 'content': t, 'single_word': False, 'lstrip': False, 'rstrip': False,
            'normalized': False, 'special': types[i] == CONTROL}
           for i, t in enumerate(tokens) if types[i] in (CONTROL, USER_DEFINED)]
  return json.dumps({
      'version': '1.0', 'truncation': None, 'padding': None, 'added_tokens': added,
      'normalizer': None,
      'pre_tokenizer': {'type': 'Sequence', 'pretokenizers': splits + [byte_level]},
      'post_processor': None,
      'decoder': {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': False,
                  'use_regex': False},
      'model': {'type': 'BPE', 'dropout': None, 'unk_token': None, 'continuing_subword_prefix': None,
                'end_of_word_suffix': None, 'fuse_unk': False, 'byte_fallback': False,
                'ignore_merges': pre in ('llama-bpe', 'llama3'),
                'vocab': {t: i for i, t in enumerate(tokens)},
                'merges': [m.split(' ', 1) for m in merges]}})


def _sentencepiece_proto(fields: dict) -> bytes:
  from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
  tokens = list(fields['tokenizer.ggml.tokens'])
  scores = list(fields.get('tokenizer.ggml.scores') or [0.0] * len(tokens))
  types = list(fields.get('tokenizer.ggml.token_type') or [NORMAL] * len(tokens))
  proto = pb.ModelProto()
  kinds = {NORMAL: pb.ModelProto.SentencePiece.NORMAL, UNKNOWN: pb.ModelProto.SentencePiece.UNKNOWN,
           CONTROL: pb.ModelProto.SentencePiece.CONTROL, UNUSED: pb.ModelProto.SentencePiece.UNUSED,
           USER_DEFINED: pb.ModelProto.SentencePiece.USER_DEFINED,
           BYTE: pb.ModelProto.SentencePiece.BYTE}
  for token, score, kind in zip(tokens, scores, types):
    piece = proto.pieces.add()
    piece.piece, piece.score, piece.type = token, float(score), kinds.get(int(kind), kinds[NORMAL])
  spec = proto.trainer_spec
  spec.model_type = pb.TrainerSpec.BPE
  spec.vocab_size = len(tokens)
  spec.byte_fallback = BYTE in types
  for key, attr in (('unknown', 'unk_id'), ('bos', 'bos_id'), ('eos', 'eos_id'),
                    ('padding', 'pad_id')):
    i = fields.get(f'tokenizer.ggml.{key}_token_id')
    setattr(spec, attr, -1 if i is None else int(i))
  if spec.unk_id < 0:  # sentencepiece needs an unknown piece
    spec.unk_id = next((i for i, k in enumerate(types) if k == UNKNOWN), 0)
  normalizer = proto.normalizer_spec
  normalizer.name = 'identity'
  normalizer.add_dummy_prefix = bool(fields.get('tokenizer.ggml.add_space_prefix', True))
  normalizer.remove_extra_whitespaces = False
  normalizer.escape_whitespaces = True
  return proto.SerializeToString()


def fields_for(tokenizer) -> dict:
  """GGUF `tokenizer.*` fields for an lm tokenizer: {key: (value, gguf value type name)}.

  A tokenizer loaded from a GGUF file gives back its own fields; a tokenizer.json with a
  byte-level BPE model becomes 'gpt2'; a SentencePiece model becomes 'llama'.
  """
  own = getattr(tokenizer, 'gguf_fields', None)
  if own:
    return {k: v for k, v in own.items() if k.startswith('tokenizer.')}
  out = {}
  if hasattr(tokenizer, 'sp'):  # a SentencePiece model
    sp = tokenizer.sp
    n = sp.GetPieceSize()
    kinds = [CONTROL if sp.IsControl(i) else UNKNOWN if sp.IsUnknown(i) else
             BYTE if sp.IsByte(i) else UNUSED if sp.IsUnused(i) else NORMAL for i in range(n)]
    out.update({'tokenizer.ggml.model': 'llama',
                'tokenizer.ggml.tokens': [sp.IdToPiece(i) for i in range(n)],
                'tokenizer.ggml.scores': [float(sp.GetScore(i)) for i in range(n)],
                'tokenizer.ggml.token_type': kinds,
                'tokenizer.ggml.add_space_prefix': True})
    if sp.unk_id() >= 0:
      out['tokenizer.ggml.unknown_token_id'] = sp.unk_id()
  elif hasattr(tokenizer, 'tok'):  # a tokenizers (tokenizer.json) model
    spec = json.loads(tokenizer.tok.to_str())
    model = spec['model']
    if model.get('type') != 'BPE' or 'ByteLevel' not in json.dumps(spec.get('pre_tokenizer')):
      raise DataError('GGUF export writes byte-level BPE (gpt2) and SentencePiece (llama) '
                      f'tokenizers; this tokenizer.json has a {model.get("type")} model without '
                      'a ByteLevel pre-tokenizer')
    vocab = dict(model['vocab'])
    for t in spec.get('added_tokens', []):
      vocab[t['content']] = t['id']
    tokens = [''] * (max(vocab.values()) + 1)
    for t, i in vocab.items():
      tokens[i] = t
    specials = {t['id']: t['special'] for t in spec.get('added_tokens', [])}
    merges = [m if isinstance(m, str) else ' '.join(m) for m in model.get('merges', [])]
    out.update({'tokenizer.ggml.model': 'gpt2',
                'tokenizer.ggml.tokens': tokens,
                'tokenizer.ggml.token_type': [
                    (CONTROL if specials[i] else USER_DEFINED) if i in specials else NORMAL
                    for i in range(len(tokens))],
                'tokenizer.ggml.merges': merges})
    out['tokenizer.ggml.pre'] = pre_name(tokenizer, out)
  else:
    raise DataError(f'GGUF export embeds SentencePiece and tokenizer.json vocabularies, not '
                    f'{type(tokenizer).__name__}')
  for key, value in (('bos', tokenizer.bos_id), ('eos', tokenizer.eos_id),
                     ('padding', tokenizer.pad_id)):
    if value is not None:
      out[f'tokenizer.ggml.{key}_token_id'] = int(value)
  # llama.cpp's default differs by vocabulary (adds_bos); saying it keeps the two the same.
  out['tokenizer.ggml.add_bos_token'] = bool(getattr(tokenizer, 'add_bos', tokenizer.bos_id is not None))
  if getattr(tokenizer, 'chat_template', None):
    out['tokenizer.chat_template'] = tokenizer.chat_template
  return out


def pre_name(tokenizer, fields: dict) -> str:
  """llama.cpp's name (`tokenizer.ggml.pre`) for how `tokenizer` splits text, found by rebuilding
  the vocabulary under each name (as lm and llama.cpp read the GGUF file) and tokenizing PROBES
  both ways: the first name that gives the same ids on every probe. Reading the regex out of
  tokenizer.json would miss equivalent spellings (SmolLM2's Digits + ByteLevel is 'smollm') and
  would call a Qwen2 split 'default' without noticing; a split no name reproduces is refused,
  since llama.cpp would tokenize differently from the model's own tokenizer, silently."""
  import tokenizers  # pylint: disable=import-outside-toplevel
  want = [tokenizer.encode(p) for p in PROBES]
  # A name whose regex tokenizer.json spells out goes first: splits that differ only where this
  # vocabulary has no tokens (Qwen2's one digit at a time vs Llama 3's three) tokenize alike.
  split = json.dumps(json.loads(tokenizer.tok.to_str()).get('pre_tokenizer'))
  named = [n for n in EXPORT_PRE if all(json.dumps(r)[1:-1] in split for r in PRE_TOKENIZERS[n])]
  for name in named + [n for n in EXPORT_PRE if n not in named]:
    candidate = tokenizers.Tokenizer.from_str(_bpe_json('export', {**fields, 'tokenizer.ggml.pre': name}))
    candidate.encode_special_tokens = True
    if [candidate.encode(p, add_special_tokens=False).ids for p in PROBES] == want:
      return name
  raise DataError('GGUF export: this tokenizer.json splits text in a way none of the llama.cpp '
                  f'pre-tokenizers lm writes ({", ".join(EXPORT_PRE)}) reproduces on its test '
                  'strings, so llama.cpp would tokenize differently; export to Hugging Face '
                  '(--format hf) and convert with llama.cpp\'s convert_hf_to_gguf.py')
