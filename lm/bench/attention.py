"""`lm bench attention`: throughput and memory of Pallas flash attention vs XLA and cuDNN.

For each sequence length and head dim, times causal forward and forward+backward of every
implementation available on the device (pallas, xla, cudnn on GPU only) and prints:
  TFLOP/s  causal-corrected: fwd = 4*B*H*S^2*K / 2; fwd+bwd = 3.5 x fwd (the backward's five
           S^2*K matmuls, one of them the recomputed Q K^T, are 2.5 x the forward's two)
  temp MiB scratch the compiled program allocates beyond its inputs and outputs
           (XLA memory_analysis; includes cuDNN workspace and Pallas outputs' temporaries)
Shapes follow the FlashAttention benchmarks: batch * S = 16k tokens, heads * K = 2048.
On CPU, Pallas runs in interpret mode: the figures check that the program runs and how its
memory scales, not speed, and the defaults shrink to fit in well under a minute.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from lm.model import attention as attention_lib
from lm.model.kernels import flash_attention


def _ints(text):
  return [int(x) for x in text.split(',') if x]


def parse_args(argv):
  on_cpu = jax.default_backend() == 'cpu'
  p = argparse.ArgumentParser(prog='lm bench attention', description=__doc__.split('\n')[0])
  p.add_argument('--seq-lens', type=_ints, default=[256, 512] if on_cpu else
                 [1024, 2048, 4096, 8192, 16384])
  p.add_argument('--head-dims', type=_ints, default=[64, 128])
  p.add_argument('--dtype', default='bfloat16', choices=['bfloat16', 'float16', 'float32'])
  p.add_argument('--impls', default='pallas,xla,cudnn', help='comma-separated subset')
  p.add_argument('--tokens', type=int, default=512 if on_cpu else 16384,
                 help='batch = max(1, tokens // seq_len)')
  p.add_argument('--width', type=int, default=128 if on_cpu else 2048,
                 help='query heads = width // head_dim')
  p.add_argument('--gqa', type=int, default=1, help='query heads per KV head')
  p.add_argument('--iters', type=int, default=1 if on_cpu else 20)
  p.add_argument('--modes', default='fwd,fwd+bwd')
  if argv and argv[0] == 'attention':
    argv = argv[1:]
  return p.parse_args(argv)


def implementations(names):
  """name -> (q, k, v) -> out, or the reason it cannot run here."""
  impls = {}
  for name in names:
    if name == 'pallas':
      impls[name] = functools.partial(flash_attention, causal=True)
    elif name == 'xla':
      impls[name] = functools.partial(attention_lib.xla_attention, causal=True)
    elif name == 'cudnn':
      impls[name] = (functools.partial(attention_lib.cudnn_attention, causal=True)
                     if jax.default_backend() == 'gpu' else 'cuDNN needs a GPU')
    else:
      raise SystemExit(f'unknown implementation {name!r}; choose from pallas, xla, cudnn')
  return impls


def program(fn, mode):
  if mode == 'fwd':
    return jax.jit(fn)

  def fwd_bwd(q, k, v, cotangent):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(cotangent)
  return jax.jit(fwd_bwd)


def temp_bytes(compiled):
  analysis = compiled.memory_analysis()
  return getattr(analysis, 'temp_size_in_bytes', None) if analysis is not None else None


def measure(fn, mode, args, iters):
  """(milliseconds per call, temp bytes) of the compiled program; the median of `iters`."""
  prog = program(fn, mode)
  call_args = args if mode == 'fwd+bwd' else args[:3]
  compiled = prog.lower(*call_args).compile()
  jax.block_until_ready(compiled(*call_args))  # warm-up
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*call_args))
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times), temp_bytes(compiled)


def flops(B, H, S, K, mode):
  fwd = 4 * B * H * S * S * K / 2
  return fwd if mode == 'fwd' else 3.5 * fwd


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else list(argv))
  dtype = jnp.dtype(args.dtype)
  impls = implementations(args.impls.split(','))
  modes = args.modes.split(',')
  device = jax.devices()[0]
  interpret = jax.default_backend() == 'cpu'
  print(f'device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, '
        f'dtype {dtype.name}, causal' + (' -- CPU: Pallas in interpret mode, times are not '
                                          'kernel speed' if interpret else ''))
  for name, fn in impls.items():
    if isinstance(fn, str):
      print(f'{name}: skipped ({fn})')
  header = f'{"impl":<7}{"mode":<9}{"S":>6}{"K":>5}{"B":>4}{"H":>4}{"ms":>10}{"TFLOP/s":>9}' \
           f'{"temp MiB":>10}'
  print(header)
  results = {}
  for K in args.head_dims:
    H = max(1, args.width // K)
    G = max(1, H // args.gqa)
    for S in args.seq_lens:
      B = max(1, args.tokens // S)
      keys = jax.random.split(jax.random.key(0), 4)
      q = jax.random.normal(keys[0], (B, S, H, K), dtype)
      k = jax.random.normal(keys[1], (B, S, G, K), dtype)
      v = jax.random.normal(keys[2], (B, S, G, K), dtype)
      cotangent = jax.random.normal(keys[3], (B, S, H, K), dtype)
      for name, fn in impls.items():
        if isinstance(fn, str):
          continue
        for mode in modes:
          try:
            ms, temp = measure(fn, mode, (q, k, v, cotangent), args.iters)
          except Exception as e:  # pylint: disable=broad-except
            # e.g. XLA running out of memory for S^2 logits: report and go on.
            print(f'{name:<7}{mode:<9}{S:>6}{K:>5}{B:>4}{H:>4}  failed: '
                  f'{type(e).__name__}: {str(e).splitlines()[0][:80]}')
            continue
          tflops = flops(B, H, S, K, mode) / (ms * 1e-3) / 1e12
          temp_mib = float('nan') if temp is None else temp / 2**20
          results[(name, mode, K, S)] = temp
          print(f'{name:<7}{mode:<9}{S:>6}{K:>5}{B:>4}{H:>4}{ms:>10.3f}{tflops:>9.2f}'
                f'{temp_mib:>10.1f}', flush=True)
  report_scaling(results, args.tokens)
  return 0


def report_scaling(results, tokens):
  """Temp memory per token across sequence lengths: flat means linear in S at fixed B."""
  print('memory scaling (temp bytes per token, shortest -> longest S; flat = linear in S):')
  for name, mode, K in sorted({key[:3] for key in results}):
    points = sorted((S, t) for (n, m, k, S), t in results.items()
                    if (n, m, k) == (name, mode, K) and t is not None)
    if len(points) < 2:
      continue
    per_token = [t / (max(1, tokens // S) * S) for S, t in points]
    growth = per_token[-1] / max(per_token[0], 1.0)
    ratio = points[-1][0] / points[0][0]
    verdict = 'linear' if growth <= 1.5 else ('quadratic' if growth >= 0.5 * ratio else 'superlinear')
    print(f'  {name:<7}{mode:<9}K={K:<4}' + ' '.join(f'{x:.0f}' for x in per_token)
          + f'  -> {verdict}')


if __name__ == '__main__':
  sys.exit(main())
