"""Pipeline throughput next to the train step's: the data must never be the bottleneck.

  lm bench data [--config configs/quickstart.py] [--batches 200] [--no-step]
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

from lm.bench import harness
from lm import config as config_lib
from lm.data import pipeline


def pipeline_tokens_per_s(cfg, workdir: str, batches: int, prefetch: int | None = None) -> dict:
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
  run = harness.LmStep(cfg)
  run.steps(2)  # compile and warm up
  return cfg.data.batch_size * cfg.data.seq_len / run.steps(steps)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  parser = argparse.ArgumentParser(prog='lm bench data', allow_abbrev=False)
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--batches', type=int, default=200)
  parser.add_argument('--steps', type=int, default=5, help='train steps timed')
  parser.add_argument('--no-step', action='store_true', help='skip timing the train step')
  parser.add_argument('--prefetch', type=int, default=None, help='default: data.prefetch')
  parser.add_argument('--workdir', default=os.path.join('/tmp', 'lm-data-bench'),
                      help='where a trained tokenizer is kept between runs')
  args, overrides = parser.parse_known_args(argv)
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
