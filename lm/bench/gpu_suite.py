"""`lm bench gpu --out DIR`: the GPU suite, one command, JSON + markdown.

Side by side in one run on one GPU:
  attention  Pallas vs cuDNN vs XLA, causal forward+backward at 2k-16k tokens (16k tokens per
             batch, 16 heads of 128), three cases: causal, packed documents (4 per row; cuDNN
             takes no segment ids, so it has no entry there), GQA (16 query heads on 4 KV heads);
  train      the 1B (Llama-3.2-1B shape) train step with each attention implementation:
             tokens/s, step time and MFU against the GPU's datasheet bf16 peak.
About 5-8 minutes on an H100/H200. `--smoke` shrinks every shape so the whole path runs on a CPU
in seconds (the figures then say nothing about speed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import config as config_lib
from lm.bench import attention as attention_bench
from lm.bench import train as train_bench
from lm.model import attention as attention_lib
from lm.model.kernels import flash_attention

IMPLEMENTATIONS = ('pallas', 'cudnn', 'xla')


def attention_cases(smoke: bool):
  """(case, S, B, H, G, K, documents per row) rows of the attention table."""
  tokens, K, H = (128, 32, 2) if smoke else (16384, 128, 16)
  lengths = (128,) if smoke else (2048, 4096, 8192, 16384)
  for case, G, docs in (('causal', H, 1), ('packed', H, 4), ('gqa', max(1, H // 4), 1)):
    for S in lengths:
      yield case, S, max(1, tokens // S), H, G, K, docs


def _impl(name, segment_ids):
  if name == 'pallas':
    return lambda q, k, v: flash_attention(q, k, v, segment_ids)
  if name == 'xla':
    return lambda q, k, v: attention_lib.xla_attention(q, k, v, segment_ids)
  return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


def run_attention(smoke: bool, iters: int, log) -> list[dict]:
  rows = []
  dtype = jnp.float32 if smoke else jnp.bfloat16
  for case, S, B, H, G, K, docs in attention_cases(smoke):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, S, H, K), dtype)
    k, v = (jax.random.normal(key, (B, S, G, K), dtype) for key in keys[1:3])
    cotangent = jax.random.normal(keys[3], (B, S, H, K), dtype)
    segments = None if docs == 1 else jnp.asarray(
        np.broadcast_to(np.repeat(np.arange(1, docs + 1), S // docs), (B, S)), jnp.int32)
    for name in IMPLEMENTATIONS:
      row = dict(case=case, impl=name, seq_len=S, batch=B, heads=H, kv_heads=G, head_dim=K)
      if name == 'cudnn' and (segments is not None or jax.default_backend() != 'gpu'):
        row['skipped'] = 'cuDNN takes no segment ids' if segments is not None else 'needs a GPU'
      else:
        try:
          ms, temp = attention_bench.measure(_impl(name, segments), 'fwd+bwd', (q, k, v, cotangent),
                                             iters)
          row.update(ms=ms, tflops=attention_bench.flops(B, H, S, K, 'fwd+bwd') / (ms * 1e-3) / 1e12,
                     temp_mib=None if temp is None else temp / 2 ** 20)
        except Exception as e:  # pylint: disable=broad-except
          row['failed'] = f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:120]}'
      rows.append(row)
      log(_attention_line(row))
  return rows


def train_config(attention: str, smoke: bool):
  c = config_lib.base_config()
  if smoke:
    c.model.update(vocab_size=128, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_dim=64,
                   max_seq_len=64)
    c.data.update(seq_len=64, batch_size=8)
  else:
    c.model.update(config_lib.MODEL_PRESETS['1b'])
    c.model.update(compute_dtype='bfloat16', remat='full')
    c.data.update(seq_len=2048, batch_size=8)
  c.model.attention = attention
  c.optimizer.update(warmup_steps=0, schedule='constant')
  c.mesh.shape.update(data=-1)  # every local device
  return c


def run_train(smoke: bool, steps: int, log) -> list[dict]:
  rows = []
  for name in IMPLEMENTATIONS:
    if name == 'cudnn' and jax.default_backend() != 'gpu':
      rows.append(dict(impl=name, skipped='needs a GPU'))
      log(f'train 1b   {name:<7} skipped (needs a GPU)')
      continue
    cfg = train_config(name, smoke)
    try:
      result = train_bench.bench_lm(cfg, steps=steps, warmup=1 if smoke else 2)
      row = dict(impl=name, batch=cfg.data.batch_size, seq_len=cfg.data.seq_len, **{
          k: result[k] for k in ('tokens_per_s', 'step_ms', 'tflops', 'mfu', 'peak_source', 'loss')})
    except Exception as e:  # pylint: disable=broad-except
      row = dict(impl=name, failed=f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:120]}')
    rows.append(row)
    log(_train_line(row))
  return rows


def _attention_line(r) -> str:
  head = f'attention {r["case"]:<7}{r["impl"]:<7}S={r["seq_len"]:<6}B={r["batch"]:<3}'
  if 'ms' in r:
    return head + f'{r["ms"]:9.3f} ms {r["tflops"]:7.2f} TFLOP/s'
  return head + f' {r.get("skipped") or r.get("failed")}'


def _train_line(r) -> str:
  if 'tokens_per_s' in r:
    return (f'train 1b   {r["impl"]:<7}{r["tokens_per_s"]:12,.0f} tokens/s {r["step_ms"]:9.1f} ms/step '
            f'MFU {r["mfu"]:.1%} ({r["peak_source"]})')
  return f'train 1b   {r["impl"]:<7}{r.get("skipped") or r.get("failed")}'


def markdown(report: dict) -> str:
  lines = [f'# GPU suite: {report["device"]}, jax {report["jax"]}', '',
           f'{report["seconds"]:.0f} s in all. Attention: causal forward+backward, '
           'TFLOP/s causal-corrected (lm/bench/attention.py).', '',
           '| case | S | B | pallas ms | cudnn ms | xla ms | pallas TFLOP/s | cudnn TFLOP/s | xla TFLOP/s |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  by_key = {(r['case'], r['seq_len'], r['impl']): r for r in report['attention']}
  for case, S, B in sorted({(r['case'], r['seq_len'], r['batch']) for r in report['attention']}):
    cells = [by_key[(case, S, i)] for i in IMPLEMENTATIONS]
    ms = [f'{c["ms"]:.3f}' if 'ms' in c else ('n/a' if 'skipped' in c else 'failed') for c in cells]
    tf = [f'{c["tflops"]:.1f}' if 'ms' in c else '' for c in cells]
    lines.append(f'| {case} | {S} | {B} | ' + ' | '.join(ms + tf) + ' |')
  lines += ['', '| train step (1B) | tokens/s | ms/step | MFU |', '| --- | --- | --- | --- |']
  for r in report['train']:
    if 'tokens_per_s' in r:
      lines.append(f'| {r["impl"]} | {r["tokens_per_s"]:,.0f} | {r["step_ms"]:.1f} | {r["mfu"]:.1%} |')
    else:
      lines.append(f'| {r["impl"]} | {r.get("skipped") or r.get("failed")} | | |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='lm bench gpu', description=__doc__.split('\n')[0])
  p.add_argument('--out', required=True, help='directory for gpu_suite.json and gpu_suite.md')
  p.add_argument('--smoke', action='store_true', help='tiny shapes: checks the path, not speed')
  p.add_argument('--iters', type=int, default=10)
  p.add_argument('--steps', type=int, default=10)
  args = p.parse_args([a for a in (sys.argv[1:] if argv is None else argv) if a != 'gpu'])
  start = time.perf_counter()
  log = lambda line: print(line, flush=True)
  device = jax.devices()[0]
  log(f'device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  report = dict(device=device.device_kind, backend=jax.default_backend(), jax=jax.__version__,
                attention=run_attention(args.smoke, args.iters, log),
                train=run_train(args.smoke, args.steps, log))
  report['seconds'] = time.perf_counter() - start
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'gpu_suite.json'), 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(args.out, 'gpu_suite.md'), 'w', encoding='utf-8') as f:
    f.write(markdown(report))
  log(f'wrote {args.out}/gpu_suite.json and gpu_suite.md ({report["seconds"]:.0f} s)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
