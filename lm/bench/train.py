"""`lm bench`: tokens/s, step time, MFU and memory of a config's train step.

With `transformers` and `torch` installed, the same shape also trains through HF transformers in
the same process (lm/bench/harness.py, alternating rounds) and the ratio is printed, so the
comparison shares one machine and one moment.
"""

from __future__ import annotations

import resource

import jax

from lm.bench import harness
from lm.train import flops as flops_lib


def with_mfu(cfg, result: dict) -> dict:
  """`result` (harness.measure's entry for lm) with TFLOP/s and MFU against the device's peak."""
  peak, source = flops_lib.peak_flops_per_device(cfg.metrics.peak_flops_per_device)
  tflops = flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len) * result['tokens_per_s']
  return {**result, 'tflops': tflops / 1e12, 'mfu': tflops / (peak * jax.device_count()),
          'peak_source': source}


def bench_lm(cfg, steps: int = 10, warmup: int = 2) -> dict:
  """lm's train step alone: tokens/s, step time, TFLOP/s, MFU, memory and loss."""
  run = harness.LmStep(cfg)
  run.steps(warmup)
  seconds = run.steps(steps)
  mem, how = run.memory()
  return with_mfu(cfg, {'tokens_per_s': cfg.data.batch_size * cfg.data.seq_len / seconds,
                        'step_ms': seconds * 1e3, 'memory_bytes': mem, 'memory': how,
                        'loss': run.loss, 'summary': run.summary})


def run(cfg, steps: int = 10, compare_hf: bool = True, rounds: int = 2) -> dict:
  B, T = cfg.data.batch_size, cfg.data.seq_len
  print(f'bench: {jax.device_count()} x {jax.devices()[0].device_kind}, batch {B} x {T} tokens, '
        f'{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, {cfg.model.compute_dtype}')
  runs = {'lm': harness.LmStep(cfg)}
  if compare_hf and harness.hf_available():
    runs['hf'] = harness.HfStep(cfg)
  elif compare_hf:
    print('hf:  skipped (install torch==2.13.0 and transformers to compare)')
  result = harness.measure(runs, B * T, steps=steps, rounds=rounds)
  ours = result['lm'] = with_mfu(cfg, result['lm'])
  source = ours['peak_source']
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
  print(f'lm:  {ours["tokens_per_s"]:,.0f} tokens/s, {ours["step_ms"]:.1f} ms/step, '
        f'{ours["tflops"]:.3f} TFLOP/s, MFU {ours["mfu"]:.1%} (peak: {source}), memory: '
        f'{ours["memory_bytes"] / 2**20:,.0f} MiB {ours["memory"]}, {rss:,.0f} MiB process peak RSS')
  if 'hf' in result:
    hf = result['hf']
    print(f'hf:  {hf["tokens_per_s"]:,.0f} tokens/s, {hf["step_ms"]:.1f} ms/step '
          f'({runs["hf"].versions})')
    print(f'lm / hf throughput: {ours["tokens_per_s"] / hf["tokens_per_s"]:.2f}x')
  return result
