"""`lm bench moe`: a Mixture-of-Experts train step beside a dense model with the same active
parameters, and the grouped matmul beside the dense-einsum reference.

  step    tokens/s of the whole train step (AdamW, one device) for
            moe (ragged)  E experts of hidden size F, k per token, dropless grouped matmul;
            moe (dense)   the same model, every expert on every token (the test reference);
            <router>      the ragged model with each other router kind of --routers
                          (lm/model/routers.py: sigmoid, topk_softmax, topk_sigmoid,
                          scaled_softmax);
            dense         one MLP of hidden size k * F: the same parameters active per token.
  layer   forward + backward of one expert layer alone on B * T tokens: ragged_dot vs einsum.
  MiB     the compiled program's temporaries (XLA's memory_analysis), for the step and the layer.

The defaults are small enough to finish in well under a minute on a CPU; on an accelerator raise
them (--d-model 1024 --expert-dim 1024 --seq-len 2048). Times are medians over --steps runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm import config as config_lib
from lm.bench import harness
from lm.model import moe as moe_lib
from lm.model import routers


def parse_args(argv):
  p = argparse.ArgumentParser(prog='lm bench moe', description=__doc__.split('\n')[0])
  p.add_argument('--d-model', type=int, default=128)
  p.add_argument('--layers', type=int, default=2)
  p.add_argument('--experts', type=int, default=8)
  p.add_argument('--top-k', type=int, default=2)
  p.add_argument('--expert-dim', type=int, default=128, help='each expert\'s hidden size F')
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--seq-len', type=int, default=128)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--routers', default=','.join(routers.KINDS[1:]),
                 help='router kinds timed beside softmax (comma-separated; empty: none)')
  args = p.parse_args(argv)
  args.routers = [r for r in args.routers.split(',') if r]
  unknown = [r for r in args.routers if r not in routers.KINDS]
  if unknown:
    p.error(f'--routers: {unknown[0]!r} is not a router; choose from {", ".join(routers.KINDS)}')
  return args


def model_configs(args) -> dict:
  """name -> config: the two MoE implementations and the dense model with equal active params."""
  def base():
    c = config_lib.base_config()
    c.model.update(vocab_size=2048, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                   n_kv_heads=4, max_seq_len=args.seq_len)
    c.data.update(batch_size=args.batch, seq_len=args.seq_len)
    c.optimizer.update(warmup_steps=0)
    c.mesh.shape.update(data=1)
    return c
  out = {}
  for implementation in ('ragged', 'dense'):
    c = base()
    c.model.moe.update(n_experts=args.experts, experts_per_token=args.top_k,
                       expert_dim=args.expert_dim, implementation=implementation)
    out[f'moe ({implementation})'] = c
  for kind in args.routers:
    if kind == 'softmax':
      continue
    c = base()
    c.model.moe.update(n_experts=args.experts, experts_per_token=args.top_k,
                       expert_dim=args.expert_dim, router=kind)
    out[kind] = c
  c = base()
  c.model.mlp_dim = args.top_k * args.expert_dim
  out['dense'] = c
  return out


def _median_seconds(fn, steps):
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _temp_mib(compiled) -> float:
  return compiled.memory_analysis().temp_size_in_bytes / 2 ** 20


def bench_layer(cfg, steps: int) -> tuple[float, float]:
  """Median seconds of one expert layer's forward + backward (input and weight gradients), and
  its compiled temporaries in MiB."""
  layer = moe_lib.MoE(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (cfg.data.batch_size, cfg.data.seq_len, cfg.model.d_model))

  def loss(params, x):
    y, _ = nnx.merge(graphdef, params)(x)
    return jnp.sum(y * y)
  fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  memory = _temp_mib(fn)
  jax.block_until_ready(fn(params, x))
  return _median_seconds(lambda: fn(params, x), steps), memory


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else [a for a in argv if a != 'moe'])
  configs = model_configs(args)
  tokens = args.batch * args.seq_len
  device = jax.devices()[0]
  print(f'device: {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}; '
        f'{args.experts} experts, top-{args.top_k}, expert dim {args.expert_dim}, d_model '
        f'{args.d_model}, {args.layers} layers, {args.batch}x{args.seq_len} tokens, median of '
        f'{args.steps}')
  print(f'{"model":<14}{"active FFN":>11}{"total FFN":>11}{"step ms":>10}{"tokens/s":>11}'
        f'{"step MiB":>10}{"layer ms":>10}{"layer MiB":>11}')
  D, L = args.d_model, args.layers
  for name, cfg in configs.items():
    m = cfg.model
    if m.moe.n_experts:
      active = L * 3 * D * m.moe.expert_dim * m.moe.experts_per_token
      total = L * (3 * D * m.moe.expert_dim * m.moe.n_experts + D * m.moe.n_experts)
    else:
      active = total = L * 3 * D * m.mlp_dim
    seconds, step_mib = harness.time_compiled_step(cfg, args.steps)
    layer = ''
    if m.moe.n_experts:
      layer_s, layer_mib = bench_layer(cfg, args.steps)
      layer = f'{layer_s * 1e3:>10.2f}{layer_mib:>11.2f}'
    print(f'{name:<14}{active / 1e6:>10.2f}M{total / 1e6:>10.2f}M{seconds * 1e3:>10.1f}'
          f'{tokens / seconds:>11,.0f}{step_mib:>10.1f}{layer}', flush=True)
  return 0


if __name__ == '__main__':
  np.set_printoptions(precision=3)
  sys.exit(main())
