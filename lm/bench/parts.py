"""The train step in three parts, lm beside transformers in one process: the loss forward alone,
forward and backward (value and gradient), and the whole step (with the optimizer update).

  python -m lm.bench.parts --config configs/bench_tiny.py [--rounds 6] [--steps 3] [--no-hf]

Each part runs `--steps` times per round, the parts in turn, so all meet the same machine load;
prints each part's median and best time per call over `--rounds` rounds. Where two frameworks'
step times differ, this says whether the forward, the backward or the update holds the
difference (docs/pretraining.md, "Benchmark").
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import jax

from lm import config as config_lib
from lm.bench.harness import HfStep, hf_available, random_batch
from lm.train.loop import Trainer


def lm_parts(cfg, *, devices=None) -> dict[str, Callable[[], float]]:
  """'lm fwd', 'lm fwd+bwd', 'lm step': each call runs the part once and returns the loss (the
  step's: before its update)."""
  trainer = Trainer(cfg, devices=devices)
  state = {'state': trainer.init_state()}
  batch = trainer.global_batch(random_batch(cfg))

  def loss(params):
    loss_sum, weight_sum, _ = trainer.objective(trainer.spec.bind(params), batch)
    return loss_sum / weight_sum

  forward, backward = jax.jit(loss), jax.jit(jax.value_and_grad(loss))
  params = jax.tree.map(lambda x: x.copy(), state['state'].params)  # the step donates its own

  def step():
    state['state'], metrics = trainer.step(state['state'], batch)
    return float(metrics['loss'])

  return {'lm fwd': lambda: float(forward(params)),
          'lm fwd+bwd': lambda: float(jax.block_until_ready(backward(params))[0]),
          'lm step': step}


def hf_parts(cfg) -> dict[str, Callable[[], float]]:
  """The same three parts in transformers (lm.bench.harness.HfStep: same shape, batch, AdamW)."""
  hf = HfStep(cfg)
  torch = hf.torch

  def forward():
    with torch.no_grad():
      return float(hf._loss())  # pylint: disable=protected-access

  def backward():
    loss = hf._loss()  # pylint: disable=protected-access
    loss.backward()
    hf.opt.zero_grad(set_to_none=True)
    return float(loss)

  def step():
    hf.steps(1)
    return hf.loss

  return {'hf fwd': forward, 'hf fwd+bwd': backward, 'hf step': step}


def time_parts(parts: dict[str, Callable[[], float]], rounds: int = 6,
               steps: int = 3) -> dict[str, list[float]]:
  """Seconds per call of each part, one entry per round; two warm-up calls each first."""
  for run in parts.values():
    run()
    run()
  times = {name: [] for name in parts}
  for _ in range(rounds):
    for name, run in parts.items():
      start = time.perf_counter()
      for _ in range(steps):
        run()
      times[name].append((time.perf_counter() - start) / steps)
  return times


def render(times: dict[str, list[float]]) -> str:
  return '\n'.join(f'{name:12s} {statistics.median(t) * 1e3:8.1f} ms  (best {min(t) * 1e3:7.1f})'
                   for name, t in times.items())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--rounds', type=int, default=6)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--no-hf', action='store_true', help='lm only')
  args, overrides = parser.parse_known_args(argv)
  cfg = config_lib.load_config(args.config, config_lib.parse_overrides(overrides))
  parts = lm_parts(cfg)
  if not args.no_hf:
    if not hf_available():
      parser.error("transformers needs torch: pip install -e '.[test]' (torch==2.13.0, CPU), or --no-hf")
    parts.update(hf_parts(cfg))
  print(render(time_parts(parts, args.rounds, args.steps)))


if __name__ == '__main__':
  main()
