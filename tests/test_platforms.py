"""lm.platforms: on a host without accelerators, with libtpu and the CUDA plugin installed (the
`plan` and `test` extras), commands and jax calls after `import lm` print nothing from them."""

import glob
import subprocess
import sys

import pytest

import lm_runs
from conftest import ROOT
from lm import host_memory, platforms

ACCELERATOR = any(glob.glob(g) for g in host_memory.ACCELERATOR_DEVICES)
# What the installed plugins print when jax tries them on a CPU host (before lm/platforms.py).
NOISE = ('Traceback', 'Unable to load CUDA', 'cudart_stub', 'Source Location Trace', 'libtpu',
         'TPU_', 'Jax plugin configuration error')


def _env(cache_dir):
  env = lm_runs.env(cache_dir, TQDM_DISABLE='1')
  del env['JAX_PLATFORMS']  # as a user's shell has it: unset
  return env


@pytest.mark.skipif(ACCELERATOR, reason='this host has accelerator device files: jax may use them')
def test_commands_print_nothing_from_the_backend_plugins(tmp_path):
  corpus = lm_runs.write_corpus(str(tmp_path / 'docs.jsonl'))
  run = str(tmp_path / 'run')
  tiny = [a for a in lm_runs.TINY if a != '--no-progress'] + [f'--config.data.train_files={corpus}']
  commands = {
      'lm --help': ['--help'],
      'lm data show': ['data', 'show', *tiny, '--examples', '1', '--batches', '1'],
      'lm train': ['train', '--workdir', run, '--no-progress', *tiny, '--config.train.steps=1'],
      'lm generate': ['generate', run, '--prompt', 'def ', '--max-new-tokens', '2'],
  }
  env = _env(str(tmp_path / 'cache'))
  for name, argv in commands.items():
    proc = subprocess.run([sys.executable, '-m', 'lm', *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f'{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}'
    noise = [line for line in proc.stderr.splitlines() if any(n in line for n in NOISE)]
    assert not noise, f'{name} printed:\n' + '\n'.join(noise[:20])
  # A notebook: jax used after `import lm`, on its CPU backend alone.
  proc = subprocess.run([sys.executable, '-c', 'import lm, jax, jax.numpy as jnp; '
                         'print(float(jnp.ones(3).sum()), jax.default_backend(), '
                         '__import__("os").environ["JAX_PLATFORMS"])'],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.split() == ['3.0', 'cpu', 'cpu'], proc.stderr
  assert proc.stderr == '', proc.stderr


def test_a_users_jax_platforms_and_accelerator_hosts_are_left_alone():
  assert platforms.cpu_only_host({}) == (not ACCELERATOR)
  assert not platforms.cpu_only_host({'JAX_PLATFORMS': 'cpu'})  # set by the user: theirs
  assert not platforms.cpu_only_host({'JAX_PLATFORMS': 'tpu'})
  environ = {'JAX_PLATFORMS': 'cuda'}
  assert not platforms.quiet_start(environ) and environ == {'JAX_PLATFORMS': 'cuda'}
  # jax was imported before lm (as here, by conftest.py): nothing is changed or hidden.
  environ = {}
  assert not platforms.quiet_start(environ) and environ == {}
  assert not platforms.compilers_hidden()


def test_hidden_cuda_plugin_imports_as_not_installed_and_comes_back():
  hider = platforms._HideModules(('some_plugin',))  # pylint: disable=protected-access
  with pytest.raises(ModuleNotFoundError, match='not loaded on this CPU host'):
    hider.find_spec('some_plugin._solver')
  assert hider.find_spec('some_plugin_other') is None
  record = platforms.logging.LogRecord(
      'jax._src.xla_bridge', platforms.logging.WARNING, __file__, 0,
      'Jax plugin configuration error: Plugin module %s does not exist', ('jax_plugins.xla_cuda12',),
      None)
  assert not platforms._DropHiddenPluginWarning().filter(record)  # pylint: disable=protected-access
  record.args = ('jax_plugins.other',)
  assert platforms._DropHiddenPluginWarning().filter(record)  # pylint: disable=protected-access


@pytest.mark.skipif(ACCELERATOR, reason='this host has accelerator device files: nothing is hidden')
def test_plan_loads_the_cuda_compiler_that_import_lm_hid(tmp_path):
  """`import lm` hides the CUDA plugin on a CPU host; importing lm.bench.plan (as `lm plan` does)
  before jax starts brings it back, so GPU targets get their compiler's devices."""
  code = ('import sys, lm; hidden = lm.platforms.compilers_hidden(); '
          'from lm.bench import targets, plan; '
          'print(hidden, lm.platforms.compilers_hidden(), len(targets.parse("h100x8").devices()))')
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=_env(str(tmp_path)),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ['True', 'False', '8'], proc.stdout + proc.stderr[-2000:]
