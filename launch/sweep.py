"""Expand a config's sweep into named runs, run them, and summarize the results.

A config file may define, next to `get_config`, a big_vision-style sweep:

    def get_hyper(hyper):
      return hyper.product([
          hyper.sweep('config.optimizer.lr', [1e-3, 3e-4, 1e-4]),
          hyper.sweep('config.optimizer.weight_decay', [0.0, 0.1]),
      ])

`hyper` is this module (`sweep`, `product`, `zip`, `fixed`, `chain`); each combination is a dict
of overrides (the `config.` prefix is optional), and runs get names such as `lr=0.001` built from
the swept values.

    python -m launch.sweep --config configs/sweep_lr.py --workdir runs/sweep1 [--dry-run]
    python -m launch.sweep ... --slurm --nodes 1 --gpus-per-node 8 ...   # one SLURM job array
    python -m launch.sweep ... --tpu --name my-tpu --zone Z ...          # one run after another
    python -m launch.sweep --config configs/sweep_lr.py --workdir runs/sweep1 --summarize-only

Runs go into `WORKDIR/<name>/`. Locally they run one after another (output in
`WORKDIR/<name>/train.log`); with `--slurm` they are one array job, with `--tpu` they run one
after another on one slice. Afterwards (or with `--summarize-only` once remote runs finish)
`WORKDIR/summary.md` holds a table of each run's final and best metrics, read from its
`metrics.jsonl`, and `WORKDIR/summary.png` plots their loss curves. `--config.k=v` arguments apply
to every run (a swept key overrides them).
"""

from __future__ import annotations

import argparse
import builtins
import inspect
import itertools
import json
import math
import os
import sys
from typing import Callable, Sequence

from launch import common
from lm import config as config_lib
from lm.errors import UserError
from lm.train.metrics import perplexity, plot_loss_curves, read_metrics

# ---------------------------------------------------------------------------------------------
# The `hyper` helpers (after big_vision): each returns a list of override dicts.


def sweep(name: str, values: Sequence) -> list[dict]:
  """One key taking each of `values`: `[{name: v} for v in values]`."""
  return [{name: v} for v in values]


def fixed(name: str, value) -> list[dict]:
  """One key with one value, for combining with sweeps."""
  return [{name: value}]


def _lists(args):
  return list(args[0]) if len(args) == 1 and not isinstance(args[0], dict) and all(
      isinstance(a, list) for a in args[0]) else list(args)


def product(*lists) -> list[dict]:
  """Every combination: `product([sweep(a, [1, 2]), sweep(b, [3, 4])])` has four runs."""
  out = []
  for combo in itertools.product(*_lists(lists)):
    merged = {}
    for d in combo:
      merged.update(d)
    out.append(merged)
  return out


def zip(*lists) -> list[dict]:  # noqa: A001 (mirrors big_vision's hyper.zip)
  """Element-wise: `zip([sweep(a, [1, 2]), sweep(b, [3, 4])])` has two runs, (1, 3) and (2, 4)."""
  lists = _lists(lists)
  if len({len(l) for l in lists}) > 1:
    raise ValueError(f'hyper.zip of lists with different lengths {[len(l) for l in lists]}')
  out = []
  for combo in builtins.zip(*lists):
    merged = {}
    for d in combo:
      merged.update(d)
    out.append(merged)
  return out


def chain(*lists) -> list[dict]:
  """One list after another (e.g. two separate product grids)."""
  return [d for l in _lists(lists) for d in l]


# ---------------------------------------------------------------------------------------------
# Expansion.


def load_hyper(config: str) -> list[dict]:
  """Calls `get_hyper(hyper)` (or `get_hyper(hyper, arg)`) of a `path.py[:arg]` config file."""
  path, _, arg = config.partition(':')
  try:
    module = config_lib.load_module(path)
  except UserError as e:
    raise SystemExit(str(e)) from None
  if not hasattr(module, 'get_hyper'):
    raise SystemExit(f'{path} defines no get_hyper(hyper); a sweep config must define one '
                     '(see launch/sweep.py)')
  fn = module.get_hyper
  hyper = sys.modules[__name__]
  params = inspect.signature(fn).parameters
  points = fn(hyper, arg or None) if len(params) >= 2 else fn(hyper)
  points = list(points)
  if not points or not all(isinstance(p, dict) for p in points):
    raise SystemExit(f'{path}: get_hyper must return a non-empty list of dicts (use hyper.sweep, '
                     'hyper.product, ...)')
  return points


def _short_names(keys: list[str]) -> dict[str, str]:
  """`optimizer.lr` -> `lr`, unless two swept keys end the same way."""
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in builtins.zip(keys, last)}


def run_name(point: dict, short: dict[str, str]) -> str:
  parts = [f'{short[common.normalize_key(k)]}={common.format_value(v)}' for k, v in point.items()]
  return ','.join(parts).replace('/', '_').replace(' ', '') or 'run'


def expand(points: list[dict], workdir: str, common_overrides=()) -> list[common.Run]:
  """Named runs under `workdir`, swept keys named by their last component where unambiguous."""
  swept = []
  for p in points:
    for k in p:
      k = common.normalize_key(k)
      if k not in swept:
        swept.append(k)
  # Keys with one value across all runs are left out of names (e.g. `hyper.fixed`).
  varying = [k for k in swept if len({repr(_get(p, k)) for p in points}) > 1]
  short = _short_names(varying)
  runs, seen = [], {}
  for i, p in enumerate(points):
    named = {k: v for k, v in p.items() if common.normalize_key(k) in short}
    name = run_name(named, short) if named else f'run{i}'
    if name in seen:
      name = f'{name}-{i}'
    seen[name] = True
    overrides = [(common.normalize_key(k), v) for k, v in common_overrides]
    overrides += [(common.normalize_key(k), v) for k, v in p.items()]
    runs.append(common.Run(name, _join(workdir, name), overrides))
  return runs


def _get(point, key):
  for k, v in point.items():
    if common.normalize_key(k) == key:
      return v
  return None


def _join(workdir, name):
  return workdir.rstrip('/') + '/' + name


# ---------------------------------------------------------------------------------------------
# Running locally.


def default_command(config: str, run: common.Run, python=None) -> list[str]:
  return common.train_command(config, run.workdir, run.overrides, python=python)


def run_local(config: str, runs: list[common.Run],
              command: Callable[[str, common.Run], list[str]] | None = None,
              restarts: int = 0) -> dict[str, int]:
  """Runs each run to completion, one after another; returns {name: exit code}."""
  command = command or default_command
  codes = {}
  for i, run in enumerate(runs):
    os.makedirs(run.workdir, exist_ok=True)
    print(f'[launch.sweep] run {i + 1}/{len(runs)}: {run.name}', flush=True)
    for attempt in range(restarts + 1):
      rc = common.run(command(config, run), log=os.path.join(run.workdir, 'train.log')).returncode
      if rc == 0:
        break
      print(f'[launch.sweep] {run.name}: exit code {rc}'
            + (f'; restart {attempt + 1}/{restarts}' if attempt < restarts else ''), flush=True)
    codes[run.name] = rc
  return codes


# ---------------------------------------------------------------------------------------------
# Summaries.


def _num(x):
  return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _overrides_text(overrides) -> str:
  return ' '.join(f'{k}={common.format_value(v)}' for k, v in overrides)


def shared_overrides(runs: list[common.Run]) -> list:
  """Overrides every run has (with the same value): listed once, above the table."""
  if len(runs) < 2:
    return []
  return [kv for kv in runs[0].overrides if all(kv in r.overrides for r in runs[1:])]


def summarize_run(run: common.Run, exit_code: int | None = None, shared=()) -> dict:
  """Final and best metrics of one run (`shared` overrides are left out of its row)."""
  recs = read_metrics(run.workdir)
  train = [(r.get('step'), _num(r['loss'])) for r in recs if _num(r.get('loss')) is not None]
  evals = [r for r in recs if _num(r.get('eval_loss')) is not None]
  steps = [r['step'] for r in recs if _num(r.get('step')) is not None]
  row = dict(name=run.name,
             overrides=_overrides_text([kv for kv in run.overrides if kv not in shared]),
             steps=max(steps) if steps else None,
             final_loss=train[-1][1] if train else None,
             best_eval_loss=None, best_eval_perplexity=None, best_eval_step=None)
  if evals:
    best = min(evals, key=lambda r: r['eval_loss'])
    row['best_eval_loss'] = best['eval_loss']
    ppl = _num(best.get('eval_perplexity'))
    row['best_eval_perplexity'] = ppl if ppl is not None else perplexity(best['eval_loss'])
    row['best_eval_step'] = best.get('step')
  if not recs:
    row['status'] = 'no metrics' if exit_code in (None, 0) else f'failed (exit {exit_code})'
  elif exit_code not in (None, 0):
    row['status'] = f'failed (exit {exit_code})'
  else:
    row['status'] = 'ok'
  return row


def _fmt(x, digits=4):
  if x is None:
    return '-'
  if isinstance(x, float):
    return f'{x:.{digits}g}'
  return str(x)


def summary_table(rows: list[dict]) -> str:
  """A Markdown table, one row per run, and the best run."""
  head = ['run', 'overrides', 'steps', 'final loss', 'best eval loss', 'best eval ppl', 'status']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['name'], f'`{r["overrides"]}`' if r['overrides'] else '-', _fmt(r['steps']),
             _fmt(r['final_loss']), _fmt(r['best_eval_loss']), _fmt(r['best_eval_perplexity']),
             r['status']]
    lines.append('| ' + ' | '.join(cells) + ' |')
  key = 'best_eval_loss' if any(r['best_eval_loss'] is not None for r in rows) else 'final_loss'
  scored = [r for r in rows if r[key] is not None]
  if scored:
    best = min(scored, key=lambda r: r[key])
    lines += ['', f'Best run by {key.replace("_", " ")}: **{best["name"]}** ({_fmt(best[key])}).']
  return '\n'.join(lines) + '\n'


def plot(runs: list[common.Run], path: str, title: str = '') -> str:
  """Training (and eval) loss against step for every run, as a PNG."""
  return plot_loss_curves({run.name: read_metrics(run.workdir) for run in runs}, path, title=title)


def write_summary(workdir: str, runs: list[common.Run], codes: dict | None = None) -> tuple[str, str]:
  """Writes WORKDIR/summary.md (and .json) and WORKDIR/summary.png; returns the .md and .png paths."""
  codes = codes or {}
  shared = shared_overrides(runs)
  rows = [summarize_run(run, codes.get(run.name), shared) for run in runs]
  os.makedirs(workdir, exist_ok=True)
  md = os.path.join(workdir, 'summary.md')
  with open(md, 'w') as f:
    f.write(f'# Sweep {os.path.basename(os.path.normpath(workdir))}\n\n')
    if shared:
      f.write(f'Every run: `{_overrides_text(shared)}`\n\n')
    f.write(summary_table(rows))
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(rows, f, indent=1)
  png = plot(runs, os.path.join(workdir, 'summary.png'), os.path.basename(os.path.normpath(workdir)))
  return md, png


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv=None, command: Callable[[str, common.Run], list[str]] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m launch.sweep', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--config', required=True, help='configs/NAME.py[:arg] defining get_hyper')
  p.add_argument('--workdir', required=True, help='sweep folder; each run goes to WORKDIR/<name>/')
  p.add_argument('--dry-run', action='store_true', help='print the runs and commands; run nothing')
  backend = p.add_mutually_exclusive_group()
  backend.add_argument('--slurm', action='store_true', help='submit one SLURM job array')
  backend.add_argument('--tpu', action='store_true', help='run on a TPU slice (see launch.tpu)')
  p.add_argument('--summarize-only', action='store_true',
                 help='only (re)write summary.md/png from the runs\' metrics.jsonl')
  p.add_argument('--only', action='append', default=[], metavar='NAME',
                 help='run only these runs (repeatable)')
  p.add_argument('--python', default=None, help='interpreter for local runs (default: this one)')
  p.add_argument('--restarts', type=int, default=0, help='local runs: re-runs after a failure')
  p.add_argument('--summary-dir', default=None,
                 help='where summary.md/png go (default: WORKDIR, or ./sweeps/NAME when WORKDIR '
                      'is a gs:// URL)')
  args, rest = p.parse_known_args(argv)
  overrides, backend_args = common.split_overrides(rest)

  runs = expand(load_hyper(args.config), args.workdir, overrides)
  summary_dir = args.summary_dir or (
      os.path.join('sweeps', os.path.basename(args.workdir.rstrip('/')))
      if '://' in args.workdir else args.workdir)
  if args.only:
    unknown = sorted(set(args.only) - {r.name for r in runs})
    if unknown:
      p.error(f'--only {unknown}: no such run; runs are {[r.name for r in runs]}')
    runs = [r for r in runs if r.name in args.only]

  if not args.summarize_only:  # every run's config, checked here before any is launched
    for r in runs:
      common.check_config(args.config, r.overrides, what=f'run {r.name}: ')
  if args.summarize_only:
    md, png = write_summary(summary_dir, runs)
    print(open(md).read() + f'\nwrote {md} and {png}')
    return 0
  if '://' in args.workdir:
    p.error(f'--workdir {args.workdir} is a URL; lm train writes through the file system: mount the '
            'bucket (gcsfuse) at the same path wherever the runs go and pass that path '
            '(--summarize-only does read URLs)')

  if args.slurm or args.tpu:
    from launch import slurm, tpu
    mod = slurm if args.slurm else tpu
    bp = argparse.ArgumentParser(prog=f'python -m launch.sweep --{"slurm" if args.slurm else "tpu"}',
                                 allow_abbrev=False)
    mod.add_args(bp)
    opts = bp.parse_args(backend_args)
  elif backend_args:
    p.error(f'unrecognized arguments: {" ".join(backend_args)}')

  if args.dry_run:
    print(f'# {len(runs)} runs in {args.workdir}')
    for r in runs:
      print(f'#   {r.name}: {" ".join(common.override_args(r.overrides))}')
    if args.slurm:
      print(slurm.dry_run_text(opts, args.config, runs))
    elif args.tpu:
      print('\n'.join(tpu.dry_run_lines(opts, args.config, runs)))
    else:
      cmd = command or (lambda c, r: default_command(c, r, args.python))
      for r in runs:
        print(common.join(cmd(args.config, r)))
    print(f'# then: {summary_dir}/summary.md and {summary_dir}/summary.png')
    return 0

  if args.slurm:
    rc = slurm.submit(opts, args.config, runs)
    print(f'[launch.sweep] when the array finishes: python -m launch.sweep --config {args.config} '
          f'--workdir {args.workdir} --summarize-only')
    return rc
  if args.tpu:
    codes = {}
    rc = tpu.launch(opts, args.config, runs)  # one slice, runs one after another
  else:
    cmd = command or (lambda c, r: default_command(c, r, args.python))
    codes = run_local(args.config, runs, cmd, restarts=args.restarts)
    rc = max(codes.values(), default=0)
  md, png = write_summary(summary_dir, runs, codes)
  print(open(md).read() + f'\nwrote {md} and {png}')
  return rc


if __name__ == '__main__':
  sys.exit(main())
