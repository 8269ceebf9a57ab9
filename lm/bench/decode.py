"""`lm bench decode`: KV-cache decoding tokens/s; with --model, a real model beside Hugging Face
transformers' `generate` on the same weights.

  lm bench decode                                   # random weights of configs/quickstart.py
  lm bench decode --model ../shared/data/smollm2-135m-instruct --new-tokens 32

--model takes what `lm generate` takes (a GGUF file or a directory holding one, a Hugging Face
directory, an lm run). Both sides decode greedily to a fixed length (no stop token) from the same
random prompts, in float32 on the CPU; decode tokens/s is B x (N - 1) over (the whole generation
minus a prefill-only run), for lm and HF alike.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import numpy as np


def _hf_model(source: str):
  """transformers' model for the same weights: a GGUF file through its gguf loader, else a HF
  directory. None (with the reason printed) when transformers cannot load it."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  from lm.io import gguf as gguf_io  # pylint: disable=import-outside-toplevel
  file = gguf_io.find_file(source)
  if file:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(os.path.abspath(file)), gguf_file=os.path.basename(file), dtype=torch.float32)
  elif os.path.isfile(os.path.join(source, 'config.json')) and not os.path.isdir(
      os.path.join(source, 'checkpoints')):
    model = transformers.AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
  else:
    print(f'HF: {source} is an lm run; export it (lm export) to compare with transformers')
    return None
  return model.eval()


def hf_benchmark(model, vocab_size: int, *, batch_sizes, prompt_len: int, new_tokens: int,
                 reps: int = 3) -> list[dict]:
  """HF generate's tokens/s, measured as lm's benchmark measures its own."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  rows = []
  for B in batch_sizes:
    tokens = torch.from_numpy(rng.integers(3, vocab_size, (B, prompt_len)).astype(np.int64))

    def run(n):
      with torch.no_grad():
        return model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)

    timings = {}
    for name, n in (('prefill', 1), ('total', new_tokens)):
      run(n)  # warm-up
      best = math.inf
      for _ in range(reps):
        start = time.perf_counter()
        out = run(n)
        best = min(best, time.perf_counter() - start)
      assert out.shape == (B, prompt_len + n)
      timings[name] = best
    decode_s = max(timings['total'] - timings['prefill'], 1e-9)
    rows.append({'batch': B, 'decode_tokens_per_s': B * (new_tokens - 1) / decode_s,
                 'prefill_ms': timings['prefill'] * 1e3})
  return rows


def main(argv=None) -> int:
  from lm.eval import generate  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog='lm bench decode')
  parser.add_argument('--model', help='a GGUF file, HF directory or lm run: lm beside HF generate')
  parser.add_argument('--batch', default='1,8')
  parser.add_argument('--prompt-len', type=int, default=64)
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--reps', '--steps', type=int, default=3, help='timed repetitions (best kept)')
  parser.add_argument('--no-hf', action='store_true')
  args, rest = parser.parse_known_args(argv)
  if not args.model:  # random weights of a config: the original decode bench
    return generate.main(['--bench', '--batch', args.batch, '--prompt-len', str(args.prompt_len),
                          '--new-tokens', str(args.new_tokens), '--reps', str(args.reps)] + rest)
  from lm.eval import evaluate  # pylint: disable=import-outside-toplevel
  model = evaluate.load_model(args.model)
  batches = tuple(int(b) for b in args.batch.split(','))
  print(f'decode bench: {args.model}, {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'{os.cpu_count()} CPUs, prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, '
        'float32')
  ours = generate.benchmark(model.cfg, batch_sizes=batches, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, reps=args.reps, params=model.params)
  theirs = None
  if not args.no_hf:
    hf = _hf_model(args.model)
    if hf is not None:
      theirs = hf_benchmark(hf, model.cfg.model.vocab_size, batch_sizes=batches,
                            prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps)
  print('| batch | lm decode tokens/s | HF generate tokens/s | lm / HF | lm prefill ms | HF prefill ms |')
  print('|---|---|---|---|---|---|')
  for k, r in enumerate(ours):
    h = theirs[k] if theirs else None
    print(f'| {r["batch"]} | {r["decode_tokens_per_s"]:,.1f} | '
          + (f'{h["decode_tokens_per_s"]:,.1f} | {r["decode_tokens_per_s"] / h["decode_tokens_per_s"]:.2f}x'
             if h else '- | -')
          + f' | {r["prefill_ms"]:.0f} | ' + (f'{h["prefill_ms"]:.0f} |' if h else '- |'))
  return 0
