"""`lm bench rollout`: rollout tokens/s of the rollout engine (lm/eval/rollout.py) beside the batch
generator it replaced (lm.eval.generate.make_generate_fn) and Hugging Face transformers' `generate`,
on the same model and the same GRPO-shaped workload.

  lm bench rollout                                    # random weights of configs/quickstart.py
  lm bench rollout --model ../shared/data/smollm2-135m-instruct --concurrency 16,64

The workload: R completions, `--group` G per prompt (as a GRPO round samples them), each with its
own length, drawn uniformly from [N / 4, N] (seeded): the ragged lengths that eos gives sampled
completions. Greedy, float32, prompts of `--prompt-len` random tokens. At concurrency C:
  engine   C slots; a finished completion's slot takes the next one at once; one prefill per prompt
  batch    batches of C rows, each decoded until its longest row is done (a batch generator
           cannot retire rows early); the G copies of a prompt are G rows
  HF       transformers' generate over the same batches of C rows, to the same lengths
Tokens/s counts the completions' own tokens (sum of lengths) over the wall time, compile excluded
(one untimed run of each first).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

from lm.bench import decode as decode_bench


def workload(R: int, G: int, N: int, prompt_len: int, vocab: int, seed: int = 0):
  """(prompts [R / G, prompt_len], lengths [R]): each prompt's G completions consecutive."""
  rng = np.random.default_rng(seed)
  prompts = rng.integers(3, vocab, (R // G, prompt_len)).astype(np.int32)
  lengths = rng.integers(max(1, N // 4), N + 1, R).astype(np.int32)
  return prompts, lengths


def _timed(fn, reps: int) -> float:
  fn()  # compile and warm up
  best = float('inf')
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def engine_seconds(spec, params, prompts, lengths, G, C, N, reps) -> float:
  from lm.eval import rollout  # pylint: disable=import-outside-toplevel
  engine = rollout.RolloutEngine(spec, rollout.Sampling(max_new_tokens=N), eos_id=None, slots=C)
  requests = []
  for p, prompt in enumerate(prompts):
    for g in range(G):  # one request per sample: each its own length, the prefill still shared
      requests.append(rollout.Request(tuple(prompt.tolist()), max_new_tokens=int(lengths[p * G + g])))
  # Requests of one prompt are prefilled together when they arrive together (prefill_batch).
  run = lambda: engine.run(params, requests, jax.random.key(0))
  got = run()
  assert [len(r[0].ids) for r in got] == lengths.tolist()
  return _timed(run, reps)


def batch_seconds(spec, params, prompts, lengths, G, C, N, reps) -> float:
  from lm.eval import generate  # pylint: disable=import-outside-toplevel
  rows = np.repeat(prompts, G, axis=0)
  fns = {}
  batches = []
  for start in range(0, len(rows), C):
    n = int(lengths[start:start + C].max())
    if n not in fns:
      fns[n] = jax.jit(generate.make_generate_fn(spec, generate.Sampling(max_new_tokens=n), eos_id=-1,
                                                 pad_id=0))
    tokens = rows[start:start + C]
    batches.append((fns[n], tokens, np.full(len(tokens), tokens.shape[1], np.int32)))

  def run():
    for fn, tokens, lens in batches:
      jax.block_until_ready(fn(params, tokens, lens, jax.random.key(0)))
  return _timed(run, reps)


def hf_seconds(model, prompts, lengths, G, C, reps) -> float:
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  rows = torch.from_numpy(np.repeat(prompts, G, axis=0).astype(np.int64))

  def run():
    with torch.no_grad():
      for start in range(0, len(rows), C):
        n = int(lengths[start:start + C].max())
        tokens = rows[start:start + C]
        model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)
  return _timed(run, reps)


def main(argv=None) -> int:
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  from lm.train.state import ModelSpec  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog='lm bench rollout')
  parser.add_argument('--model', help='a GGUF file, HF directory or lm run (default: random weights of --config)')
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--concurrency', default='16,64', help='concurrent sequences, comma-separated')
  parser.add_argument('--completions', type=int, default=128, help='R: completions per run')
  parser.add_argument('--group', type=int, default=8, help='G: completions per prompt')
  parser.add_argument('--prompt-len', type=int, default=64)
  parser.add_argument('--new-tokens', type=int, default=128, help='N: the longest completion')
  parser.add_argument('--reps', type=int, default=1, help='timed repetitions (best kept)')
  parser.add_argument('--no-hf', action='store_true')
  args = parser.parse_args(argv)
  if args.completions % args.group:
    raise SystemExit(f'lm bench rollout: --completions {args.completions} is not a multiple of '
                     f'--group {args.group}')
  if args.model:
    from lm.eval import evaluate  # pylint: disable=import-outside-toplevel
    loaded = evaluate.load_model(args.model)
    cfg, params, name = loaded.cfg, loaded.params, args.model
  else:
    cfg = config_lib.load_config(args.config)
    params, name = None, f'{args.config} (random weights)'
  spec = ModelSpec(cfg.model)
  if params is None:
    params = jax.jit(spec.init)(jax.random.key(0))
  prompts, lengths = workload(args.completions, args.group, args.new_tokens, args.prompt_len,
                              cfg.model.vocab_size)
  useful = int(lengths.sum())
  hf = None if args.no_hf or not args.model else decode_bench._hf_model(args.model)  # pylint: disable=protected-access
  print(f'rollout bench: {name}, {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'{os.cpu_count()} CPUs; {args.completions} completions ({args.group} per prompt), prompt '
        f'{args.prompt_len}, lengths uniform in [{max(1, args.new_tokens // 4)}, {args.new_tokens}] '
        f'({useful:,} tokens), greedy, float32')
  print('| concurrent | engine tokens/s | batch generator tokens/s | HF generate tokens/s | '
        'engine / batch | engine / HF |')
  print('|---|---|---|---|---|---|')
  for C in (int(c) for c in args.concurrency.split(',')):
    g = args.group
    e = useful / engine_seconds(spec, params, prompts, lengths, g, C, args.new_tokens, args.reps)
    b = useful / batch_seconds(spec, params, prompts, lengths, g, C, args.new_tokens, args.reps)
    h = useful / hf_seconds(hf, prompts, lengths, g, C, args.reps) if hf is not None else None
    print(f'| {C} | {e:,.1f} | {b:,.1f} | ' + (f'{h:,.1f}' if h else '-') + f' | {e / b:.2f}x | '
          + (f'{e / h:.2f}x' if h else '-') + ' |', flush=True)
  return 0
