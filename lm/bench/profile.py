"""Where the train step's time goes, op by op: a `jax.profiler` trace of a few steps, summed by
XLA op and matched to the compiled HLO so each row says what the op computes.

  python -m lm.bench.profile --config configs/bench_tiny.py
  python -m lm.bench.profile --config configs/bench_tiny.py --config.train.trainable=lora --top 20

On CPU the trace holds one event per executed thunk (a fusion, a dot, a copy); on GPU and TPU the
device ops. Ops that run concurrently on XLA's thread pool are each counted in full, so the
column sums to more than the step's wall time when the backend overlaps them. Within one profile
the shares mean something even on a loaded machine; absolute times do not.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from lm import config as config_lib
from lm.bench.harness import random_batch
from lm.train.loop import Trainer

_HOST_EVENTS = re.compile(r'^(\$|PjitFunction|CommonPjRt|PjRt|Handle inputs|ParseArguments|'
                          r'AllocateOutput|PythonRefManager|ThunkExecutor|Execute)')


def op_times(trace_dir: str) -> dict:
  """{hlo op name: total microseconds} from the perfetto trace jax.profiler wrote under trace_dir."""
  paths = glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}')
  with gzip.open(paths[0]) as f:
    trace = json.load(f)
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get('ph') != 'X':
      continue
    op = (e.get('args') or {}).get('hlo_op')
    if op and not _HOST_EVENTS.match(e['name']):
      totals[op] += e.get('dur', 0.0)
  return dict(totals)


def describe_ops(hlo_text: str) -> dict:
  """{instruction name: 'shape = opcode(...)' abbreviated} for every instruction of the HLO."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r'\s*(?:ROOT )?%?([\w.\-]+) = (\S+(?: \S+)?) ([\w\-]+)\((.*)', line)
    if m:
      name, shape, opcode, rest = m.groups()
      calls = re.search(r'calls=%?([\w.\-]+)', rest)
      kind = re.search(r'kind=(\w+)', rest)
      out[name] = f'{opcode}{"/" + kind.group(1) if kind else ""} -> {shape[:60]}' + (
          f' ({calls.group(1)})' if calls else '')
  return out


def fusion_roots(hlo_text: str) -> dict:
  """{computation name: its ROOT instruction's opcode and the ops it contains} for fused
  computations, so a fusion's row names the work inside it (dot, exponential, transpose...)."""
  out, current, ops = {}, None, []
  for line in hlo_text.splitlines():
    head = re.match(r'^%?([\w.\-]+) .*\{\s*$', line)
    if head and not line.startswith(' '):
      current, ops = head.group(1), []
      continue
    if current is None:
      continue
    m = re.match(r'\s*(?:ROOT )?%?[\w.\-]+ = \S+(?: \S+)? ([\w\-]+)\(', line)
    if m and m.group(1) not in ('parameter', 'constant', 'bitcast', 'get-tuple-element', 'tuple'):
      ops.append(m.group(1))
    if line.strip() == '}':
      out[current] = ','.join(dict.fromkeys(ops))[:70]
      current = None
  return out


def profile_step(cfg, *, steps: int = 3, warmup: int = 2, trace_dir: str | None = None,
                 devices=None):
  """Trace `steps` train steps of `cfg` after `warmup`; returns (seconds per step, op totals in
  microseconds per step, op descriptions)."""
  trainer = Trainer(cfg, devices=devices)
  state = trainer.init_state()
  batch = trainer.global_batch(random_batch(cfg))
  for _ in range(warmup):
    state, metrics = trainer.step(state, batch)
  jax.block_until_ready((state, metrics))
  hlo = trainer.step.lower(state, batch).compile().as_text()
  trace_dir = trace_dir or tempfile.mkdtemp(prefix='lm-profile-')
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      state, metrics = trainer.step(state, batch)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - start) / steps
  per_step = {op: us / steps for op, us in op_times(trace_dir).items()}
  described = describe_ops(hlo)
  roots = fusion_roots(hlo)
  descriptions = {}
  for op in per_step:
    d = described.get(op, '')
    called = re.search(r'\(([\w.\-]+)\)$', d)
    if called and called.group(1) in roots:
      d += f' [{roots[called.group(1)]}]'
    descriptions[op] = d
  return seconds, per_step, descriptions


def render(seconds: float, per_step: dict, descriptions: dict, top: int) -> str:
  total = sum(per_step.values())
  lines = [f'step {seconds * 1e3:.1f} ms wall; ops sum to {total / 1e3:.1f} ms per step '
           f'({len(per_step)} distinct ops)',
           f'{"ms/step":>9} {"share":>6}  op  (what it is)']
  for op, us in sorted(per_step.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f'{us / 1e3:>9.1f} {100 * us / total:>5.1f}%  {op}  {descriptions.get(op, "")}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--trace-dir', help='keep the trace here (TensorBoard / Perfetto can open it)')
  args, overrides = parser.parse_known_args(argv)
  cfg = config_lib.load_config(args.config, config_lib.parse_overrides(overrides))
  seconds, per_step, descriptions = profile_step(cfg, steps=args.steps, trace_dir=args.trace_dir)
  print(render(seconds, per_step, descriptions, args.top))


if __name__ == '__main__':
  main()
