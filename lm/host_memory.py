"""glibc malloc settings that stop XLA's CPU runtime from faulting its temporaries in every step.

XLA's CPU client allocates an executable's temporaries as one block (459 MB for the step of
configs/bench_tiny.py) with posix_memalign, from one of its worker threads. glibc serves a block
that large from a thread's arena only with mmap, and unmaps it when it is freed, so every step
faults the whole block in again: 112k page faults and 220 ms of kernel time in a 636 ms step
(`getrusage`, docs/pretraining.md). With one arena, no mmap and no trimming, the block stays in
the heap and the next step reuses it: no faults, and the step took 538 ms.

The settings have to be made before XLA's threads first allocate, so `import lm` applies them
(lm/__init__.py), before jax starts its CPU backend. They apply only where that backend is the one
that will run: a Linux host with glibc, no accelerator device files and JAX_PLATFORMS unset or
'cpu'. `LM_HOST_MALLOC=system` leaves glibc's defaults (`tuned`, the default, applies them; any
other value is an error, so a typo cannot silently mean the opposite). The cost: the heap never
shrinks by itself and fragments, and the threads share one arena; the train loop hands its free
pages back between phases and at each log line (`release_free_pages`).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys

from lm.errors import ConfigError

# mallopt parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
ACCELERATOR_DEVICES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*')
SETTING = 'LM_HOST_MALLOC'
_applied = False  # whether keep_freed_memory set them in this process
CHOICES = ('tuned', 'system')


def cpu_backend_expected(environ=os.environ, device_globs=ACCELERATOR_DEVICES) -> bool:
  """Whether jax will run on the host CPU: no TPU or GPU device files, JAX_PLATFORMS unset or cpu."""
  platforms = environ.get('JAX_PLATFORMS', '').strip().lower()
  if platforms and platforms.split(',')[0] != 'cpu':
    return False
  return platforms.startswith('cpu') or not any(glob.glob(g) for g in device_globs)


def requested_setting(environ=os.environ) -> str:
  """`LM_HOST_MALLOC` as one of CHOICES (unset or empty: 'tuned'); ConfigError for anything else."""
  value = environ.get(SETTING, '').strip().lower() or 'tuned'
  if value not in CHOICES:
    raise ConfigError(f'{SETTING}={environ[SETTING]!r} is not a setting: use {SETTING}=system for '
                      f"glibc's malloc defaults, or unset it (or 'tuned') for lm's")
  return value


def keep_freed_memory(environ=os.environ) -> bool:
  """Applies the settings above where they help; True if they were applied."""
  if requested_setting(environ) == 'system' or not sys.platform.startswith('linux'):
    return False
  if not cpu_backend_expected(environ):
    return False
  try:
    libc = ctypes.CDLL('libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # not glibc (musl, ...): nothing to set
    return False
  # -1 is the largest size_t to glibc's trim threshold: never give the heap's top back.
  global _applied
  _applied = all(mallopt(param, value) == 1 for param, value in
                 ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)))
  return _applied


def release_free_pages() -> None:
  """Gives the kernel back the free pages inside the heap (glibc's malloc_trim(0), which
  madvises them away wherever they lie), where the settings above are in force. Without it the
  heap keeps the peak of every phase that allocated differently from the train step: loading and
  dequantizing a checkpoint, compiling, evaluating; on SmolLM2-135M's LoRA run the process grew
  to 24 GB (7 GB with glibc's defaults) and was killed at step 24. The train loop calls it after
  the first step, after each evaluation and at each log line: between those the step's own
  temporaries stay mapped."""
  if not _applied:
    return
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
