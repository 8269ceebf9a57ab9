"""`lm bench finetune`: full fine-tuning and LoRA, lm against HF transformers (+ PEFT), one process.

Same shape (default configs/bench_tiny.py), same batch, fp32, AdamW, global-norm clipping, LoRA
rank 16 on every linear layer of the blocks (q, k, v, o, gate, up, down; alpha 32, no dropout)
on both sides. Timing and memory accounting: lm/bench/harness.py.
"""

from __future__ import annotations

import argparse
import copy

import jax

from lm import config as config_lib
from lm.bench import harness


def lora_variant(cfg, rank: int):
  c = copy.deepcopy(cfg)
  c.model.lora.update(rank=rank, alpha=2.0 * rank, dropout=0.0, targets=harness.LORA_TARGETS)
  c.train.trainable = 'lora'
  return c


def run(cfg, *, steps: int = 5, rounds: int = 3, rank: int = 16, compare_hf: bool = True) -> dict:
  B, T = cfg.data.batch_size, cfg.data.seq_len
  print(f'bench finetune: {jax.device_count()} x {jax.devices()[0].device_kind}, batch {B} x {T}, '
        f'{cfg.model.n_layers} layers, d_model {cfg.model.d_model}, vocab {cfg.model.vocab_size}, '
        f'{cfg.model.compute_dtype}; LoRA r={rank} on q,k,v,o,gate,up,down')
  runs = {'lm full': harness.LmStep(cfg), 'lm lora': harness.LmStep(lora_variant(cfg, rank))}
  if compare_hf and harness.hf_available():
    runs['hf full'] = harness.HfStep(cfg)
    runs['hf+peft lora'] = harness.HfStep(cfg, lora_rank=rank)
  elif compare_hf:
    print('hf: skipped (install torch==2.13.0, transformers and peft to compare)')
  results = harness.measure(runs, B * T, steps=steps, rounds=rounds)
  for name, r in results.items():
    print(f'{name:13s} {r["tokens_per_s"]:10,.0f} tokens/s  {r["step_ms"]:8.1f} ms/step  '
          f'{r["memory_bytes"] / 2**20:8,.1f} MiB ({r["memory"]})  {r["summary"]}')
  ratio = lambda a, b, key: results[a][key] / results[b][key]
  print(f'lm lora / lm full step time: {ratio("lm lora", "lm full", "step_ms"):.2f}x (target <= 0.75)'
        f'; memory {ratio("lm lora", "lm full", "memory_bytes"):.2f}x')
  if 'hf full' in results:
    print(f'lm / hf full fine-tuning:    {ratio("lm full", "hf full", "tokens_per_s"):.2f}x tokens/s '
          f'(target >= 1), memory {ratio("lm full", "hf full", "memory_bytes"):.2f}x')
    print(f'lm / hf+peft lora:           {ratio("lm lora", "hf+peft lora", "tokens_per_s"):.2f}x '
          f'tokens/s (target >= 1.3), memory {ratio("lm lora", "hf+peft lora", "memory_bytes"):.2f}x')
  return results


def main(argv=None) -> int:
  """python -m lm.bench.finetune [--config configs/bench_tiny.py] [--steps N] [--rank R] [--no-hf]"""
  parser = argparse.ArgumentParser(prog='lm bench finetune', allow_abbrev=False)
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--steps', type=int, default=5, help='steps per round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--rank', type=int, default=16)
  parser.add_argument('--no-hf', action='store_true')
  args, overrides = parser.parse_known_args(argv)
  cfg = config_lib.load_config(args.config, overrides)
  run(cfg, steps=args.steps, rounds=args.rounds, rank=args.rank, compare_hf=not args.no_hf)
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
