"""The run directory: names inside it that cannot escape it, atomic writes, and no partial output
when a run fails to start.

Everything a run writes (checkpoints, metrics, tokenizer, config and summary records, exports) goes
under `--workdir`; `inside` is the only way a name becomes a path there.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import sys
import tempfile
import time

from lm.errors import UserError


def prepare(workdir: str) -> str:
  """The absolute run directory, created if needed, or a UserError saying why it cannot be."""
  if re.match(r'[A-Za-z][A-Za-z0-9+.-]*://', workdir):  # else gs://b/x would become ./gs:/b/x
    raise UserError(f'--workdir {workdir} is a URL; lm writes runs through the file system: mount '
                    'the bucket (e.g. with gcsfuse) and pass the mounted path')
  workdir = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f'--workdir {workdir} exists and is not a directory; choose another path')
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = tempfile.NamedTemporaryFile(dir=workdir, prefix='.lm-write-test-')
    probe.close()
  except OSError as e:
    raise UserError(f'cannot write to --workdir {workdir} ({e.strerror}); choose a writable '
                    'directory') from None
  return workdir


def inside(root: str, *names: str) -> str:
  """root/name/..., resolved; refuses names that would leave `root` (absolute paths, '..', or
  symbolic links pointing outside), so crafted names cannot write or read elsewhere."""
  for name in names:
    if not name or os.path.isabs(name) or '\x00' in name:
      raise UserError(f'{name!r} is not a relative name inside the run directory {root}')
  root_real = os.path.realpath(root)
  path = os.path.realpath(os.path.join(root_real, *names))
  if os.path.commonpath([path, root_real]) != root_real:
    raise UserError(f'{os.path.join(*names)!r} leads outside the run directory {root}; use a '
                    'plain name inside it')
  return path


# Every name a training run writes directly under its run directory.
WRITTEN = ('checkpoints', 'checkpoints-unreadable', 'config.json', 'identity.json', 'summary.json',
           'metrics.jsonl', 'tensorboard', 'tokenizer.model', 'trackers.json', 'wandb')


def check_confined(workdir: str) -> None:
  """Refuses, before anything is written, a run directory where a name the run writes is a
  symbolic link leading out of it."""
  for name in WRITTEN:
    inside(workdir, name)


def write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically: readers see the old file or the new one, never half."""
  directory = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix='.' + os.path.basename(path) + '.')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


def has_checkpoints(workdir: str) -> bool:
  """Whether `workdir` holds a complete checkpoint step (a resume, not a new run)."""
  return any(name.isdigit() for name in _checkpoint_steps(workdir))


def _checkpoint_steps(workdir: str) -> set[str]:
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  return set(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else set()


@contextlib.contextmanager
def removed_on_user_error(workdir: str, *, is_main: bool = True, keep=('checkpoints-unreadable',)):
  """On a UserError, removes whatever appeared in `workdir` during the block (the directory itself
  if it was created), unless a checkpoint was written: a run that failed to start leaves nothing.
  Entries named in `keep` (checkpoints set aside as unreadable) stay for inspection."""
  existed = os.path.isdir(workdir)
  before = set(os.listdir(workdir)) if existed else set()
  steps_before = _checkpoint_steps(workdir)
  try:
    yield
  except UserError:
    if is_main and os.path.isdir(workdir) and _checkpoint_steps(workdir) <= steps_before:
      for name in set(os.listdir(workdir)) - before - set(keep):
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(OSError):
            os.unlink(path)
      if not existed:
        with contextlib.suppress(OSError):
          os.rmdir(workdir)
    raise


LOCK = '.lm-writer.lock'


@contextlib.contextmanager
def single_writer(workdir: str, *, enabled: bool = True):
  """Holds the run directory's writer lock for the block: a second `lm train` on the same run
  fails at once naming the holder. The lock is an flock on `LOCK`, which the kernel releases when
  its process dies however it dies, so a lock left by a killed run is taken over (with a note);
  the file records the holder's pid, host and start time for the message."""
  if not enabled:  # other processes of a multi-host run write through process 0
    yield
    return
  path = inside(workdir, LOCK)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      raise UserError(f'run directory {workdir} is being written by another lm train '
                      f'({_holder(fd) or "holder unknown"}); wait for it to finish or stop it '
                      '(use another --workdir for a separate run)') from None
    previous = _holder(fd)
    if previous:
      print(f'lm: warning: took over the writer lock of {previous}, which is no longer running',
            file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on {socket.gethostname()} since '
                  f'{time.strftime("%Y-%m-%d %H:%M:%S")}'.encode(), 0)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)  # a clean exit leaves no holder behind
  finally:
    os.close(fd)  # releases the flock


def _holder(fd: int) -> str:
  return os.pread(fd, 200, 0).decode('utf-8', 'replace').strip()
