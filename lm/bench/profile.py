"""Where the train step's time goes, op by op: a `jax.profiler` trace of a few steps, summed by
XLA op and matched to the compiled HLO so each row says what the op computes.

  python -m lm.bench.profile --config configs/bench_tiny.py
  python -m lm.bench.profile --config configs/bench_tiny.py --config.train.trainable=lora --top 20
  python -m lm.bench.profile --config configs/bench_tiny.py --hf   # + kinds of work beside transformers

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
from lm.bench.harness import hf_available, random_batch
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


LM_KINDS = ('matmul', 'copy / transpose', 'zero-fill', 'other')
HF_MATMULS = ('aten::mm', 'aten::addmm', 'aten::bmm', 'aten::matmul', 'aten::linear')


def lm_kind(op: str, description: str) -> str:
  """What kind of work an XLA op of the step is, from its name and its fused ops."""
  fused = set(re.findall(r'[\w\-]+', description.split('[', 1)[1])) if '[' in description else set()
  opcode = description.split('/', 1)[0].split(' ', 1)[0]
  if opcode == 'dot' or 'dot' in fused:
    return 'matmul'
  if opcode in ('copy', 'transpose') or fused & {'copy', 'transpose'}:
    return 'copy / transpose'
  if op.startswith('wrapped_broadcast') or (opcode == 'broadcast' and not fused):
    return 'zero-fill'
  return 'other'


def by_kind(per_step: dict, descriptions: dict) -> dict:
  """{kind: microseconds per step} over lm's ops (lm_kind)."""
  out = dict.fromkeys(LM_KINDS, 0.0)
  for op, us in per_step.items():
    out[lm_kind(op, descriptions.get(op, ''))] += us
  return out


def hf_kind(name: str) -> str:
  if name in HF_MATMULS:
    return 'matmul'
  if 'scaled_dot_product' in name:
    return 'attention (one fused kernel)'
  if name in ('aten::copy_', 'aten::contiguous', 'aten::clone', 'aten::transpose'):
    return 'copy / transpose'
  return 'other'


def profile_hf(cfg, *, steps: int = 3, warmup: int = 2) -> tuple[float, dict]:
  """The same step in transformers (lm.bench.harness.HfStep) under torch.profiler: (seconds per
  step, {kind: microseconds per step}) from each op's self time."""
  import torch  # pylint: disable=import-outside-toplevel
  from lm.bench.harness import HfStep  # pylint: disable=import-outside-toplevel
  hf = HfStep(cfg)
  hf.steps(warmup)
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    seconds = hf.steps(steps)
  kinds = collections.Counter()
  for event in prof.key_averages():
    kinds[hf_kind(event.key)] += event.self_cpu_time_total / steps
  return seconds, dict(kinds)


def render_kinds(lm_seconds: float, lm_kinds: dict, hf_seconds: float, hf_kinds: dict) -> str:
  rows = list(dict.fromkeys([*LM_KINDS, *hf_kinds]))
  lines = [f'{"ms per step":<30}{"lm":>10}{"transformers":>14}',
           f'{"step (wall)":<30}{lm_seconds * 1e3:>10.1f}{hf_seconds * 1e3:>14.1f}']
  cell = lambda us, width: f'{us / 1e3:>{width}.1f}' if us is not None else ' ' * width
  for kind in rows:
    lines.append(f'{kind:<30}{cell(lm_kinds.get(kind), 10)}{cell(hf_kinds.get(kind), 14)}')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--top', type=int, default=15)
  parser.add_argument('--trace-dir', help='keep the trace here (TensorBoard / Perfetto can open it)')
  parser.add_argument('--hf', action='store_true',
                      help='also profile the same step in transformers (torch.profiler) and print '
                           'both by kind of work')
  args, overrides = parser.parse_known_args(argv)
  if args.hf and not hf_available():
    parser.error("--hf needs torch and transformers: pip install -e '.[test]' (torch==2.13.0, CPU)")
  cfg = config_lib.load_config(args.config, config_lib.parse_overrides(overrides))
  seconds, per_step, descriptions = profile_step(cfg, steps=args.steps, trace_dir=args.trace_dir)
  print(render(seconds, per_step, descriptions, args.top))
  if args.hf:
    hf_seconds, hf_kinds = profile_hf(cfg, steps=args.steps)
    print(render_kinds(seconds, by_kind(per_step, descriptions), hf_seconds, hf_kinds))


if __name__ == '__main__':
  main()
