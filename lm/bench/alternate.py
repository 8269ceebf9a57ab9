"""Step time of config variants measured alternately in one process: on a machine shared with
other work, absolute times drift with the load, but variants timed in turn meet the same load, so
their ratio holds.

  python -m lm.bench.alternate --config configs/bench_tiny.py \\
      --variant model.loss_chunk_size=0 --variant model.loss_chunk_size=512

Each variant is `key=value[,key=value...]` applied over the config; the first is the baseline.
Prints each variant's median step time over `--rounds` rounds of `--steps` steps and its ratio to
the baseline, in wall time and in this process's CPU time. On a loaded machine the CPU time is the
steadier of the two (it does not count the time other processes hold the cores), though it also
counts threads that spin while they wait.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from lm import config as config_lib
from lm.bench.harness import random_batch
from lm.train.loop import Trainer


def _variant(config: str, spec: str):
  cfg = config_lib.load_config(config)
  for item in filter(None, spec.split(',')):
    key, _, value = item.partition('=')
    config_lib.apply_override(cfg, key, value)
  trainer = Trainer(cfg)
  state = trainer.init_state()
  batch = trainer.global_batch(random_batch(cfg))
  for _ in range(2):  # compile, then one more to settle
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  return {'trainer': trainer, 'state': state, 'batch': batch, 'times': [], 'cpu': []}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--variant', action='append', required=True,
                      help='key=value[,key=value]; the first is the baseline')
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--steps', type=int, default=3)
  args = parser.parse_args(argv)
  variants = {spec: _variant(args.config, spec) for spec in args.variant}
  for _ in range(args.rounds):
    for v in variants.values():
      start, cpu_start = time.perf_counter(), time.process_time()
      for _ in range(args.steps):
        v['state'], metrics = v['trainer'].step(v['state'], v['batch'])
      jax.block_until_ready((v['state'], metrics))
      v['times'].append((time.perf_counter() - start) / args.steps)
      v['cpu'].append((time.process_time() - cpu_start) / args.steps)
  first = next(iter(variants.values()))
  base, cpu_base = statistics.median(first['times']), statistics.median(first['cpu'])
  print(f'{"variant":<48}{"median ms/step":>16}{"vs first":>10}{"CPU ms/step":>13}{"vs first":>10}')
  for spec, v in variants.items():
    ms, cpu = statistics.median(v['times']), statistics.median(v['cpu'])
    print(f'{spec:<48}{ms * 1e3:>16.1f}{ms / base:>9.2f}x{cpu * 1e3:>13.1f}{cpu / cpu_base:>9.2f}x')


if __name__ == '__main__':
  main()
