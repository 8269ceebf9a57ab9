"""Where documents come from: text/jsonl/json files and globs, and a built-in offline corpus.

A source yields documents (strings). `builtin:python-docs` is the reference documentation every
CPython install ships (pydoc_data topics plus the standard library's docstrings), so the
quickstart needs no download.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sysconfig

from lm.errors import DataError

BUILTIN_PREFIX = 'builtin:'


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


def _read_text(path: str) -> str:
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path}: byte {e.start} is not valid UTF-8; re-encode the file as UTF-8') from None


def _field(record, field: str, where: str) -> str:
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise DataError(f'{where}: no field {field!r} (has {keys}); set data.text_field')
  value = record[field]
  if not isinstance(value, str):
    raise DataError(f'{where}: field {field!r} is {type(value).__name__}, expected a string')
  return value


def read_file(path: str, text_field: str = 'text') -> list[str]:
  """Documents of one file: jsonl/json records' `text_field`, or blank-line separated paragraphs."""
  text = _read_text(path)
  if path.endswith('.jsonl'):
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: malformed JSON ({e.msg}); fix or remove the line') from None
      docs.append(_field(record, text_field, f'{path}:{lineno}'))
    return docs
  if path.endswith('.json'):
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}: malformed JSON at line {e.lineno} ({e.msg})') from None
    if not isinstance(records, list):
      raise DataError(f'{path}: expected a JSON list of records')
    return [_field(r, text_field, f'{path}[{i}]') for i, r in enumerate(records)]
  return [p.strip() for p in text.split('\n\n') if p.strip()]


def python_docs() -> list[str]:
  """CPython's own documentation: the pydoc topics and stdlib docstrings of 200+ characters."""
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
  root = sysconfig.get_paths()['stdlib']
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
      for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
          doc = ast.get_docstring(node)
          if doc and len(doc) >= 200:
            docs.append(doc)
  return docs


BUILTINS = {'python-docs': python_docs}


def read_documents(spec: str, text_field: str = 'text') -> list[str]:
  """All non-empty documents named by `spec` (files, globs, or builtin:NAME)."""
  if spec.startswith(BUILTIN_PREFIX):
    name = spec[len(BUILTIN_PREFIX):]
    if name not in BUILTINS:
      raise DataError(f'unknown built-in corpus {spec!r}; choose one of '
                      f'{[BUILTIN_PREFIX + n for n in BUILTINS]}')
    docs = BUILTINS[name]()
  else:
    docs = [d for path in expand_files(spec) for d in read_file(path, text_field)]
  docs = [d for d in docs if d.strip()]
  if not docs:
    raise DataError(f'{spec}: no non-empty documents found')
  return docs
