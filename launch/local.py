"""Run `lm train` on this machine.

    python -m launch.local --config configs/quickstart.py --workdir runs/quick \
        [--config.train.steps=200 ...] [--restarts 3] [--log runs/quick/train.log] [--dry-run]

One process drives every local accelerator (JAX's default on a single host). `--processes N`
starts N processes joined by `jax.distributed` on localhost instead — useful for exercising the
multi-controller code path on one machine. `--restarts N` re-runs a failed run up to N times on the
same workdir; training resumes from the latest checkpoint there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from launch import common


def add_args(p: argparse.ArgumentParser) -> None:
  p.add_argument('--python', default=None,
                 help='interpreter that runs `-m lm train` (default: this one)')
  p.add_argument('--restarts', type=int, default=0,
                 help='re-run a failed run this many times on the same workdir (resumes)')
  p.add_argument('--log', default=None, help='also append the output to this file')
  p.add_argument('--processes', type=int, default=1,
                 help='processes joined by jax.distributed on localhost (default 1)')
  p.add_argument('--port', type=int, default=12355, help='coordinator port for --processes > 1')


def process_envs(processes: int, port: int) -> list[dict[str, str]]:
  """The environment of each process: empty for one, `jax.distributed` settings for several."""
  if processes <= 1:
    return [{}]
  return [dict(LM_DISTRIBUTED='1', LM_COORDINATOR_ADDRESS=f'localhost:{port}',
               LM_NUM_PROCESSES=str(processes), LM_PROCESS_ID=str(i)) for i in range(processes)]


def commands(args, config: str, workdir: str, overrides) -> list[tuple[dict[str, str], list[str]]]:
  argv = common.train_command(config, workdir, overrides, python=args.python)
  return [(env, argv) for env in process_envs(args.processes, args.port)]


def dry_run_lines(args, config, workdir, overrides) -> list[str]:
  return [common.env_prefix(env) + common.join(argv)
          for env, argv in commands(args, config, workdir, overrides)]


def _run_once(args, procs) -> int:
  if len(procs) == 1:
    env, argv = procs[0]
    return common.run(argv, env=env, log=args.log).returncode
  running = []
  for i, (env, argv) in enumerate(procs):
    print('+', common.env_prefix(env) + common.join(argv), flush=True)
    log = None
    if args.log:
      root, ext = os.path.splitext(args.log)
      os.makedirs(os.path.dirname(os.path.abspath(args.log)), exist_ok=True)
      log = open(f'{root}.{i}{ext or ".log"}', 'ab')
    running.append((subprocess.Popen(argv, env={**os.environ, **env}, stdout=log,
                                     stderr=subprocess.STDOUT if log else None), log))
  rc = 0
  while running:
    for proc, log in list(running):
      code = proc.poll()
      if code is None:
        continue
      running.remove((proc, log))
      if log:
        log.close()
      if code and not rc:
        rc = code
        for other, _ in running:  # one process failed: the collective step cannot finish
          other.terminate()
    time.sleep(0.2)
  return rc


def launch(args, config: str, workdir: str, overrides) -> int:
  procs = commands(args, config, workdir, overrides)
  rc = 0
  for attempt in range(args.restarts + 1):
    if attempt:
      print(f'[launch.local] exit code {rc}; restart {attempt}/{args.restarts} '
            f'(resumes from the latest checkpoint in {workdir})', flush=True)
    rc = _run_once(args, procs)
    if rc == 0:
      break
  return rc


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m launch.local', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  p.add_argument('--workdir', required=True)
  p.add_argument('--dry-run', action='store_true', help='print the commands and exit')
  add_args(p)
  args, rest = p.parse_known_args(argv)
  overrides, unknown = common.split_overrides(rest)
  if unknown:
    p.error(f'unrecognized arguments: {" ".join(unknown)}')
  if args.dry_run:
    print('\n'.join(dry_run_lines(args, args.config, args.workdir, overrides)))
    return 0
  return launch(args, args.config, args.workdir, overrides)


if __name__ == '__main__':
  sys.exit(main())
