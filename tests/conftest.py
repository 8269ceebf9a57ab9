"""Tests run on 8 virtual CPU devices so sharded code paths run everywhere (CI has no accelerator)."""

import os
import shutil
import subprocess
import sys
import tempfile

# Tests run on the CPU even where libtpu or the CUDA plugin is installed (the `plan` extra): those
# compile for TPU/GPU targets without the hardware (lm plan), and must not claim this host's chips.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# Most of the suite's time is XLA compiling several hundred small programs that then run for
# milliseconds. Two flags cut that compile time: no LLVM optimisation of the machine code (~40% of
# the suite's time), and XLA:CPU's older loop emitters instead of its MLIR fusion emitters, which
# compile each fusion through a pipeline of MLIR passes (two train-step tests: 20.0 s, now 9.4 s).
# They change how fast the code runs, not what it computes (XLA's fusion and algebraic passes run
# as before). Subprocesses the tests start get them too (lm_runs.env, test_docs).
FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false')


def _known_to_xla(flags):
  """The flags this jaxlib's XLA accepts. XLA aborts a process whose XLA_FLAGS name a flag it does
  not know, and a newer XLA may drop one of these (the fusion emitters' switch is recent)."""
  def accepted(candidate):
    env = dict(os.environ, XLA_FLAGS=' '.join(candidate), JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                          capture_output=True, timeout=300).returncode == 0
  return flags if accepted(flags) else tuple(f for f in flags if accepted((f,)))


# Probed once, by the controller (or a run without xdist); the workers inherit the answer.
if 'LM_TEST_XLA_FLAGS' not in os.environ:
  os.environ['LM_TEST_XLA_FLAGS'] = ' '.join(_known_to_xla(FAST_COMPILE_FLAGS))
TEST_XLA_FLAGS = os.environ['LM_TEST_XLA_FLAGS']
if TEST_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402

jax.config.update('jax_num_cpu_devices', 8)

# One persistent compilation cache for the whole session, shared by the pytest-xdist workers (they
# inherit the controller's environment): many tests compile the same small programs. Entries are
# keyed by the program and the compiler, so a hit is the executable a fresh compile would give.
_OWN_CACHE = 'LM_TEST_JAX_CACHE' not in os.environ  # the controller (or a run without xdist)
if _OWN_CACHE:
  os.environ['LM_TEST_JAX_CACHE'] = tempfile.mkdtemp(prefix='lm-test-jax-cache-')
jax.config.update('jax_compilation_cache_dir', os.environ['LM_TEST_JAX_CACHE'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.environ.get('LM_SHARED_DATA', os.path.join(ROOT, '..', 'shared', 'data'))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm import config as config_lib  # noqa: E402


def tiny_config(**model):
  """A model small enough that a step compiles and runs in about a second."""
  c = config_lib.base_config()
  # scan_layers=True: the path every real model (more than 4 layers) takes; 2 layers would unroll.
  c.model.update(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=64,
                 max_seq_len=64, scan_layers=True)
  c.model.update(model)
  c.data.update(seq_len=16, batch_size=8)
  c.optimizer.update(lr=1e-2, warmup_steps=0, schedule='constant')
  c.train.update(steps=10)
  c.mesh.shape.update(data=1)
  return c


def random_batch(c, seed=0, docs_per_row=1):
  """Random tokens; with docs_per_row > 1, rows are packed with that many equal documents."""
  rng = np.random.default_rng(seed)
  B, T = c.data.batch_size, c.data.seq_len
  tokens = rng.integers(0, c.model.vocab_size, (B, T + 1), dtype=np.int32)
  seg = np.repeat(np.arange(1, docs_per_row + 1), -(-T // docs_per_row))[:T]
  segment_ids = np.broadcast_to(seg, (B, T)).astype(np.int32)
  pos = np.concatenate([np.arange(np.sum(seg == s)) for s in range(1, docs_per_row + 1)])
  weights = np.ones((B, T), np.float32)
  weights[:, :-1] *= (seg[1:] == seg[:-1])
  return {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': weights,
          'segment_ids': segment_ids.copy(), 'positions': np.broadcast_to(pos, (B, T)).astype(np.int32)}


def train_steps(c, steps=1):
  """(trainer, state, parameters before, parameters after) of `steps` train steps of `c` on one
  device, step i on random_batch(c, seed=i)."""
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  before = jax.device_get(state.params)
  for seed in range(steps):
    state, _ = trainer.step(state, trainer.global_batch(random_batch(c, seed=seed)))
  return trainer, state, before, jax.device_get(state.params)


def one_device_mesh():
  """The default config's mesh on the first device. Where a test loads a real model, a mesh over
  all 8 virtual devices would shard it: a 135M model then decoded 3x slower (CPU collectives)."""
  from lm import sharding  # pylint: disable=import-outside-toplevel
  return sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])


@pytest.fixture
def cfg():
  return tiny_config()


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:  # the workers have finished: the cache goes with the session
    shutil.rmtree(os.environ['LM_TEST_JAX_CACHE'], ignore_errors=True)


# The longest tests are dealt out first. pytest-xdist's load scheduler gives each worker a run of
# consecutive tests (a quarter of its share) and then more as they finish; the docs pages (one to
# two minutes each) were collected near the end, so a worker ended on them while the other had
# nothing left (1.84 of 2 cores used in a 15-minute run). Dealt round-robin into the first runs,
# they overlap the many short tests instead.
LONGEST_FIRST = ('tests/test_docs.py::test_doc_commands_run', 'tests/io/test_smollm2.py',
                 'tests/test_multihost.py', 'tests/test_host_memory.py', 'tests/bench/test_plan.py',
                 'tests/bench/test_harness.py')


def pytest_collection_modifyitems(config, items):
  del config
  rank = lambda item: next((i for i, p in enumerate(LONGEST_FIRST) if item.nodeid.startswith(p)),
                           len(LONGEST_FIRST))
  longest = sorted((item for item in items if rank(item) < len(LONGEST_FIRST)), key=rank)
  rest = [item for item in items if rank(item) == len(LONGEST_FIRST)]
  workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))  # the same in every worker
  first_run = max(len(items) // workers // 4, 2)  # xdist's initial run per worker (LoadScheduling)
  ordered = []
  for w in range(workers):
    dealt = longest[w::workers]
    fill = max(first_run - len(dealt), 0)
    ordered += dealt + rest[:fill]
    rest = rest[fill:]
  items[:] = ordered + rest
