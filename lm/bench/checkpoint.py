"""`lm bench checkpoint`: how long a config's checkpoints take to save (blocking vs async) and to
restore, against building the state from scratch. Figures in docs/reliability.md come from here.

  lm bench checkpoint --config configs/quickstart.py
  lm bench checkpoint --config configs/quickstart.py --model-preset 125m
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from lm.train.checkpoint import Checkpointer
from lm.train.loop import Trainer


def _timed(fn):
  t0 = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def _bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _disk(path) -> int:
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _like_trained(state):
  """Noise on every float leaf: optimizer moments are zero at init and would compress too well."""
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return treedef.unflatten([
      x + 1e-3 * jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating)
      else x for x, k in zip(leaves, keys)])


def run(cfg, repeats: int = 3, directory: str | None = None) -> dict:
  trainer = Trainer(cfg)
  state, _ = _timed(trainer.init_state)  # compiles the initialiser
  state, init_s = _timed(trainer.init_state)
  state = jax.jit(_like_trained, out_shardings=trainer.shardings, donate_argnums=0)(state)
  out = {'params': trainer.spec.param_count(), 'state_mib': _bytes(state) / 2**20, 'init_s': init_s}
  with tempfile.TemporaryDirectory(dir=directory) as tmp:
    for mode in ('blocking', 'async'):
      ckpt = Checkpointer(os.path.join(tmp, mode), keep=repeats + 2, async_save=mode == 'async')
      ckpt.save(1, state, {'position': 1})  # warm-up: handlers, directories
      ckpt.wait()
      returned, finished = [], []
      for step in range(2, repeats + 2):
        t0 = time.perf_counter()
        ckpt.save(step, state, {'position': step})
        returned.append(time.perf_counter() - t0)
        ckpt.wait()
        finished.append(time.perf_counter() - t0)
      out[f'{mode}_returns_s'] = statistics.median(returned)
      out[f'{mode}_done_s'] = statistics.median(finished)
      out['disk_mib'] = _disk(os.path.join(tmp, mode, 'checkpoints', '2')) / 2**20
      if mode == 'async':
        (restored, _), out['restore_s'] = _timed(
            lambda: ckpt.restore(trainer.abstract_state, trainer.shardings))  # pylint: disable=cell-var-from-loop
        del restored
      ckpt.close()
  out['resume_overhead_s'] = out['restore_s'] - out['init_s']
  return out


def main(cfg, repeats: int = 3) -> int:
  r = run(cfg, repeats)
  print(f'checkpoint bench: {r["params"]:,} parameters, train state {r["state_mib"]:,.0f} MiB '
        f'({r["disk_mib"]:,.0f} MiB on disk), {jax.device_count()} x {jax.devices()[0].device_kind}; '
        f'median of {repeats}')
  print(f'  save, blocking:  {r["blocking_done_s"]:.3f}s')
  print(f'  save, async:     {r["async_returns_s"]:.3f}s until training continues, '
        f'{r["async_done_s"]:.3f}s until written')
  print(f'  restore:         {r["restore_s"]:.3f}s (fresh init {r["init_s"]:.3f}s: resume overhead '
        f'{r["resume_overhead_s"]:+.3f}s)')
  return 0
