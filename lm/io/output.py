"""Where lm writes what a command produces, and the one check every writer goes through.

An output must never land on what a command reads: `lm export --workdir RUN --out RUN` once wrote
the Hugging Face config.json over the run's own and left a run that no longer loads. So every
output path (`lm export`, `lm eval`, `lm compare`, `lm generate --out`) is checked first:

  - it is not a run directory or model it reads, nor inside one, nor a folder that holds one;
  - it is not inside any lm run directory (one with checkpoints/ and config.json);
  - an existing folder is empty, or is a previous output of the same kind from the same source
    (it holds MARKER naming that source): a folder of someone else's files is never mixed with ours.

Directories are then written whole into a hidden sibling and renamed into place once complete, so
a failure leaves the old output (or nothing), never half of a new one; files are written to a
sibling and os.replace()d.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

from lm.errors import UserError

MARKER = '.lm-output.json'  # in an output folder: {"kind": ..., "sources": [...]}


def _real(path: str) -> str:
  return os.path.realpath(os.path.abspath(os.path.expanduser(path)))


def _inside(path: str, folder: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_run_directory(path: str) -> bool:
  return os.path.isdir(os.path.join(path, 'checkpoints')) and os.path.isfile(
      os.path.join(path, 'config.json'))


def enclosing_run(path: str) -> str | None:
  """The lm run directory `path` is, or is inside; None when there is none."""
  here = _real(path)
  while True:
    if is_run_directory(here):
      return here
    parent = os.path.dirname(here)
    if parent == here:
      return None
    here = parent


def check(out: str, flag: str, sources=(), *, kind: str, folder: bool, any_source: bool = False,
          legacy=(), replaceable=None) -> None:
  """UserError unless `out` may be written by a command of `kind` reading `sources`. An existing
  folder may be replaced when it is an earlier output of `kind` (from the same sources unless
  `any_source`), or holds only `legacy` names (outputs written before the marker existed); an
  existing file when `replaceable(path)` says so."""
  real = _real(out)
  for source in sources:
    if not source or not os.path.exists(source):
      continue
    src = _real(source)
    if real == src:
      raise UserError(f'{flag} {out} is the input this command reads; write to a new path')
    if _inside(real, src):
      raise UserError(f'{flag} {out} is inside {source}, which this command reads; write outside it')
    if _inside(src, real):
      raise UserError(f'{flag} {out} holds {source}, which this command reads; writing there could '
                      'destroy it, so name a path beside it')
  run = enclosing_run(out)
  if run is not None:
    raise UserError(f'{flag} {out} is inside the lm run directory {run}; write outside it')
  if not os.path.lexists(out):
    return
  if folder and not os.path.isdir(out):
    raise UserError(f'{flag} {out} exists and is not a directory; name a new or existing directory')
  if not folder and os.path.isdir(out):
    raise UserError(f'{flag} {out} is a directory; name a file to write')
  if not folder and replaceable is not None and not replaceable(out):
    raise UserError(f'{flag} {out} exists and is not an earlier {kind}; name a new file')
  if folder and os.listdir(out) and not _same_output(out, kind, sources, any_source, legacy):
    whose = '' if any_source else f' of {", ".join(sources)}'
    raise UserError(f'{flag} {out} is a folder of other files (not an earlier {kind}{whose}); '
                    'name a new or empty directory')


def _same_output(out: str, kind: str, sources, any_source: bool, legacy) -> bool:
  names = set(os.listdir(out))
  if legacy and names <= set(legacy):
    return True
  try:
    with open(os.path.join(out, MARKER), encoding='utf-8') as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return False
  return (isinstance(marker, dict) and marker.get('kind') == kind
          and (any_source or marker.get('sources') == [_real(s) for s in sources]))


@contextlib.contextmanager
def directory(out: str, flag: str, sources=(), *, kind: str, writer: bool = True, **rules):
  """Yields a fresh hidden sibling of `out` to write the whole output into; on success it
  replaces `out` (an earlier output of the same kind, or nothing) by renaming. On failure the
  sibling is removed and `out` is as it was. Only the `writer` process renames. `rules`: check's."""
  check(out, flag, sources, kind=kind, folder=True, **rules)
  parent, name = os.path.split(_real(out))
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(parent, f'.{name}.lm-partial')
  if writer and os.path.lexists(partial):
    shutil.rmtree(partial)  # what a killed export left; nothing else is named so
  os.makedirs(partial, exist_ok=True)
  try:
    yield partial
  except BaseException:
    if writer:
      shutil.rmtree(partial, ignore_errors=True)
    raise
  if not writer:
    return
  with open(os.path.join(partial, MARKER), 'w', encoding='utf-8') as f:
    json.dump({'kind': kind, 'sources': [_real(s) for s in sources]}, f)
  old = os.path.join(parent, f'.{name}.lm-old')
  if os.path.lexists(old):
    shutil.rmtree(old)
  if os.path.isdir(out):
    os.rename(out, old)
  os.rename(partial, out)
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def file(out: str, flag: str, sources=(), *, kind: str, replaceable=None):
  """Yields a sibling path to write; it replaces `out` atomically on success."""
  check(out, flag, sources, kind=kind, folder=False, replaceable=replaceable)
  parent, name = os.path.split(_real(out))
  os.makedirs(parent, exist_ok=True)
  partial = os.path.join(parent, f'.{name}.lm-partial{os.getpid()}')
  try:
    yield partial
    os.replace(partial, out)
  finally:
    if os.path.lexists(partial):
      os.unlink(partial)


def write_text(path: str, text: str) -> None:
  """One file of an output folder, replaced atomically (a reader never sees half of it)."""
  partial = f'{path}.lm-partial{os.getpid()}'
  try:
    with open(partial, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(partial, path)
  finally:
    if os.path.lexists(partial):
      os.unlink(partial)
