"""Pipeline throughput next to the train step's: the data must never be the bottleneck.

  python -m lm.bench.data [--config configs/quickstart.py] [--batches 200] [--no-step]
                          [--config.a.b=value ...]

Prints tokens/s of the pipeline (batches of the config's shape, from encoded records to packed
arrays, after building the corpus) and, unless --no-step, of the config's jitted train step on the
same shapes, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def pipeline_tokens_per_s(cfg, workdir: str, batches: int, prefetch: int | None = None) -> dict:
  from lm.data import pipeline  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  corpus = pipeline.build_corpus(cfg.data, tokenizer)
  build_s = time.perf_counter() - t0
  it = pipeline.BatchIterator(corpus.train, cfg.data.batch_size, cfg.data.seed, prefetch=prefetch)
  next(it)  # warm up
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  elapsed = time.perf_counter() - t0
  it.close()
  tokens = batches * cfg.data.batch_size * cfg.data.seq_len
  return {'tokens_per_s': tokens / elapsed, 'build_s': build_s, 'describe': corpus.describe()}


def step_tokens_per_s(cfg, steps: int = 5) -> float:
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(cfg)
  state = trainer.init_state()
  B, T = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (B, T + 1), dtype=np.int32)
  batch = trainer.global_batch({
      'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'weights': np.ones((B, T), np.float32),
      'segment_ids': np.ones((B, T), np.int32), 'positions': np.tile(np.arange(T, dtype=np.int32), (B, 1))})
  for _ in range(2):  # compile and warm up
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready(metrics)
  return steps * B * T / (time.perf_counter() - t0)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog='python -m lm.bench.data', allow_abbrev=False)
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--steps', type=int, default=5, help='train steps timed')
  parser.add_argument('--no-step', action='store_true', help='skip timing the train step')
  parser.add_argument('--prefetch', type=int, default=None, help='default: data.prefetch')
  parser.add_argument('--workdir', default=os.path.join('/tmp', 'lm-data-bench'),
                      help='where a trained tokenizer is kept between runs')
  args, overrides = parser.parse_known_args(argv)
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load_config(args.config, overrides)
  os.makedirs(args.workdir, exist_ok=True)
  data = pipeline_tokens_per_s(cfg, args.workdir, args.batches, args.prefetch)
  print(data['describe'])
  print(f'pipeline: {data["tokens_per_s"]:,.0f} tokens/s ({args.batches} batches of '
        f'{cfg.data.batch_size} x {cfg.data.seq_len}; corpus built in {data["build_s"]:.1f} s)')
  if not args.no_step:
    step = step_tokens_per_s(cfg, args.steps)
    print(f'train step: {step:,.0f} tokens/s ({args.config}); pipeline/step = '
          f'{data["tokens_per_s"] / step:.1f}x')
  return 0


if __name__ == '__main__':
  sys.exit(main())
