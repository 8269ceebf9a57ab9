"""Which backends jax starts: the CPU alone on a host without accelerators, quietly.

The `plan` and `test` extras install libtpu and the CUDA plugin on CPU hosts, to compile for TPU and
GPU targets (`lm plan`). Left to itself, jax then tries every installed backend at its first call:
the CUDA plugin logs a 20-line traceback ("Unable to load CUDA. Is it installed?"), libtpu logs
its "Source Location Trace", and each of the CUDA plugin's extension libraries logs "Could not find
cuda drivers" as it loads, on every command.

`import lm` therefore, on a host with no accelerator device files and JAX_PLATFORMS unset:
  - sets JAX_PLATFORMS=cpu, so no other backend is started (a user's own setting is kept);
  - keeps the CUDA plugin's modules unimported, so none of its libraries load (and log).
The TPU compiler needs nothing: `lm plan` loads libtpu on its own, compile-only. The CUDA
compiler comes back with `load_compilers()`, which `lm plan` and lm.bench.targets call before
jax is imported. Where jax was imported before lm (a notebook, the tests), nothing is hidden.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import sys

from lm import host_memory

# The CUDA plugin's packages: its extension libraries and the PJRT plugin jax discovers.
CUDA_MODULES = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_plugins.xla_cuda12',
                'jax_plugins.xla_cuda13')


class _HideModules(importlib.abc.MetaPathFinder):
  """Makes `import NAME` (and its submodules) fail as for a package that is not installed."""

  def __init__(self, names):
    self.names = tuple(names)

  def find_spec(self, fullname, path=None, target=None):
    del path, target
    if fullname in self.names or fullname.startswith(tuple(n + '.' for n in self.names)):
      raise ModuleNotFoundError(f'{fullname} is not loaded on this CPU host (lm/platforms.py)',
                                name=fullname)
    return None


class _DropHiddenPluginWarning(logging.Filter):
  """jax logs a warning for each plugin it is told about (by entry point) but cannot import."""

  def filter(self, record):
    args = record.args if isinstance(record.args, tuple) else ()
    return not (record.getMessage().startswith('Jax plugin configuration error: Plugin module')
                and any(a in CUDA_MODULES for a in args))


_hider: _HideModules | None = None
_log_filter = _DropHiddenPluginWarning()


def cpu_only_host(environ=os.environ) -> bool:
  """No TPU or GPU device files, and JAX_PLATFORMS unset: jax could only ever run on the CPU."""
  return not environ.get('JAX_PLATFORMS', '').strip() and host_memory.cpu_backend_expected(environ)


def quiet_start(environ=os.environ) -> bool:
  """On a CPU-only host, before jax is imported: the CPU backend alone, and the CUDA plugin
  hidden. True if it changed anything."""
  global _hider
  if 'jax' in sys.modules or not cpu_only_host(environ):
    return False
  environ['JAX_PLATFORMS'] = 'cpu'
  if _hider is None:
    _hider = _HideModules(CUDA_MODULES)
    sys.meta_path.insert(0, _hider)
    logging.getLogger('jax._src.xla_bridge').addFilter(_log_filter)
  return True


def load_compilers() -> None:
  """Lets jax load the CUDA plugin again (for compiling to GPU targets), if it has not started
  yet; the CPU stays the only backend that runs."""
  global _hider
  if _hider is None or 'jax' in sys.modules:
    return
  sys.meta_path.remove(_hider)
  logging.getLogger('jax._src.xla_bridge').removeFilter(_log_filter)
  _hider = None


def compilers_hidden() -> bool:
  """Whether the CUDA plugin stays unloaded in this process (jax started with it hidden)."""
  return _hider is not None
