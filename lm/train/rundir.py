"""The run directory: names inside it that cannot escape it, atomic writes, and no partial output
when a run fails to start.

Everything a run writes (checkpoints, metrics, tokenizer, config and summary records, exports) goes
under `--workdir`; `inside` is the only way a name becomes a path there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile

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
