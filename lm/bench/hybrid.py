"""`lm bench hybrid`: one gated-DeltaNet layer beside one attention layer, as the train step runs
them, at growing sequence lengths.

  lm bench hybrid [--seq-lens 2048,4096,8192] [--d-model 256] [--steps 3] [--impl auto]
                  [--mixers attention,deltanet]

Each row is a one-layer model (the layer, its MLP, the embedding and the head; AdamW) whose
token mixer is either full causal attention (`model.layer_types=('full',)`) or gated DeltaNet
(`('linear',)`, the chunked form; lm/model/mixers/gated_deltanet.py), on one sequence of T
tokens: the median train-step time over --steps (after a compile and two settling steps), tokens/s,
and the compiled step's temporaries (XLA's memory_analysis). Attention's cost grows as T^2, the
DeltaNet's as T. The whole train step is timed, through lm.Trainer, rather than the layer's
forward and backward compiled alone: that program hung on its second call on the CPU
development machine (docs/models.md).

--impl picks the implementation of both mixers (`model.attention`): auto, xla or pallas (the
Pallas kernels: TPU and GPU; on CPU auto is the jnp/XLA form).
"""

from __future__ import annotations

import argparse
import sys

import jax

from lm import config as config_lib
from lm.bench import harness

# --mixers name -> (the row's name, model.layer_types entry)
MIXERS = {'attention': ('attention', 'full'), 'deltanet': ('gated DeltaNet', 'linear')}


def parse_args(argv):
  p = argparse.ArgumentParser(prog='lm bench hybrid', description=__doc__.split('\n')[0])
  p.add_argument('--seq-lens', default='2048,4096,8192', help='comma-separated sequence lengths')
  p.add_argument('--d-model', type=int, default=256)
  p.add_argument('--heads', type=int, default=4, help='attention heads = DeltaNet value heads')
  p.add_argument('--head-dim', type=int, default=64)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--impl', default='auto', choices=('auto', 'xla', 'pallas'))
  p.add_argument('--mixers', default='attention,deltanet',
                 help='which layers to time: attention, deltanet or both (comma-separated)')
  args = p.parse_args(argv)
  args.mixers = [m for m in args.mixers.split(',') if m]
  unknown = [m for m in args.mixers if m not in MIXERS]
  if unknown or not args.mixers:
    p.error(f'--mixers {unknown[0] if unknown else "(none)"!r}: choose attention, deltanet or both')
  try:
    args.seq_lens = [int(t) for t in args.seq_lens.split(',') if t]
  except ValueError:
    p.error(f'--seq-lens {args.seq_lens!r}: give whole numbers separated by commas, e.g. 2048,4096')
  if not args.seq_lens or min(args.seq_lens) < 64 or any(t % 64 for t in args.seq_lens):
    p.error(f'--seq-lens {args.seq_lens}: each must be a multiple of 64 (the DeltaNet chunk), at least 64')
  return args


def layer_config(kind: str, seq_len: int, args):
  """A one-layer model whose token mixer is `kind` ('full' or 'linear')."""
  c = config_lib.base_config()
  c.model.update(vocab_size=512, d_model=args.d_model, n_layers=1, n_heads=args.heads,
                 n_kv_heads=args.heads, head_dim=args.head_dim, mlp_dim=2 * args.d_model,
                 max_seq_len=seq_len, layer_types=(kind,), attention=args.impl)
  c.model.linear_attn.update(n_key_heads=max(1, args.heads // 2), n_value_heads=args.heads,
                             key_head_dim=args.head_dim, value_head_dim=args.head_dim)
  c.data.update(batch_size=1, seq_len=seq_len)
  c.optimizer.update(warmup_steps=0)
  c.mesh.shape.update(data=1)
  config_lib.validate(c)
  return c


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else [a for a in argv if a != 'hybrid'])
  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; one layer, '
        f'd_model {args.d_model}, {args.heads} heads of {args.head_dim}, batch 1, '
        f'model.attention={args.impl}, median of {args.steps} train steps')
  print('| tokens | layer | step ms | tokens/s | temporaries MiB |')
  print('|---|---|---|---|---|')
  for seq_len in args.seq_lens:
    for name, kind in (MIXERS[m] for m in MIXERS if m in args.mixers):
      seconds, mib = harness.time_compiled_step(layer_config(kind, seq_len, args), args.steps)
      print(f'| {seq_len:,} | {name} | {seconds * 1e3:.1f} | {seq_len / seconds:,.0f} | {mib:.1f} |',
            flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
