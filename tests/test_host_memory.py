"""lm.host_memory: XLA's per-step temporaries stay in the heap instead of being faulted in again."""

import os
import subprocess
import sys
import textwrap

import pytest

from lm import host_memory
from lm.errors import ConfigError

# A jitted function whose 128 MiB of temporaries (a cumulative sum of 16M floats, then every other
# element; far above glibc's largest mmap threshold, 32 MiB) are allocated and freed on every call;
# prints the minor page faults of each of 32 calls.
_PROBE = textwrap.dedent('''
    import resource
    import lm, jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.sum(jnp.cumsum(x * 2.0)[::2]))
    x = jnp.ones((16 * 1024 * 1024,), jnp.float32)
    faults = []
    for _ in range(32):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      f(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(lm.HOST_MALLOC_TUNED, *faults)
''')


def _faults(**env):
  out = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True, check=True,
                       # XLA_FLAGS='': compiled as in production (the suite's conftest turns
                       # LLVM optimisation off, which makes this cumsum ~10x slower).
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '', **env},
                       timeout=300)
  tuned, *faults = out.stdout.split('\n')[-2].split()
  return tuned == 'True', [int(f) for f in faults]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_temporaries_are_not_faulted_in_again_on_every_call():
  tuned, faults = _faults()
  default, default_faults = _faults(LM_HOST_MALLOC='system')
  assert tuned and not default
  # 128 MiB / 4 KiB pages = 32,768 faults each time a call maps its temporaries afresh: glibc's
  # defaults do so on every call. Tuned, the heap keeps them. It grows a few times first: a call's
  # temporaries are freed on XLA's thread just after the result is ready, so the next call can
  # start before they are back (5-7 times in 200 calls, then no more).
  assert min(default_faults[1:]) >= 32_768, default_faults
  assert sum(f >= 30_000 for f in faults) <= len(faults) // 2, faults


def test_cpu_backend_expected_from_devices_and_jax_platforms(tmp_path):
  (tmp_path / 'accel0').touch()
  accelerator = (str(tmp_path / 'accel*'),)
  none = (str(tmp_path / 'nvidia[0-9]*'),)
  assert host_memory.cpu_backend_expected({}, none)
  assert not host_memory.cpu_backend_expected({}, accelerator)
  assert host_memory.cpu_backend_expected({'JAX_PLATFORMS': 'cpu'}, accelerator)
  assert not host_memory.cpu_backend_expected({'JAX_PLATFORMS': 'tpu,cpu'}, none)
  assert not host_memory.cpu_backend_expected({'JAX_PLATFORMS': 'cuda'}, none)


def test_opt_out_and_accelerator_hosts_leave_glibc_alone():
  assert not host_memory.keep_freed_memory({'LM_HOST_MALLOC': 'system'})
  assert not host_memory.keep_freed_memory({'JAX_PLATFORMS': 'tpu'})


def test_setting_is_tuned_system_or_an_error():
  assert host_memory.requested_setting({}) == 'tuned'
  assert host_memory.requested_setting({'LM_HOST_MALLOC': ' System '}) == 'system'
  assert host_memory.requested_setting({'LM_HOST_MALLOC': 'tuned'}) == 'tuned'
  with pytest.raises(ConfigError, match="LM_HOST_MALLOC='off' is not a setting: use LM_HOST_MALLOC=system"):
    host_memory.keep_freed_memory({'LM_HOST_MALLOC': 'off'})


def test_a_bad_setting_stops_import_with_one_line_and_exit_2():
  out = subprocess.run([sys.executable, '-c', 'import lm'], capture_output=True, text=True,
                       env={**os.environ, 'LM_HOST_MALLOC': 'off'}, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "lm: error: LM_HOST_MALLOC='off' is not a setting: use LM_HOST_MALLOC=system for glibc's "
      "malloc defaults, or unset it (or 'tuned') for lm's"]


_FRAGMENTED = textwrap.dedent('''
    import numpy as np
    import lm
    from lm import host_memory
    def rss_mb():
      with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * 4096 / 2**20
    big, keep = [], []
    for i in range(200):  # 4 MiB blocks from the heap (no mmap), each pinned by a small one above it
      big.append(np.ones(1 << 20, np.float32))
      keep.append(np.ones(64, np.float32))
    del big
    before = rss_mb()
    host_memory.release_free_pages()
    print(lm.HOST_MALLOC_TUNED, round(before), round(rss_mb()))
''')


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_free_pages_inside_the_heap_go_back_when_released():
  out = subprocess.run([sys.executable, '-c', _FRAGMENTED], capture_output=True, text=True, check=True,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, timeout=120)
  tuned, before, after = out.stdout.split()
  # The 800 MiB freed below live blocks stay resident (the top cannot be trimmed) until released.
  assert tuned == 'True' and int(before) - int(after) >= 700, out.stdout
