"""Run `lm train` on every worker of a Cloud TPU VM slice.

    python -m launch.tpu --config configs/NAME.py --workdir /mnt/shared/runs/NAME \
        --name my-tpu --zone us-central2-b --accelerator-type v4-32 \
        [--create | --queued] [--spot] [--install git+https://github.com/ORG/lm@main | dist/lm.whl] \
        [--restarts 5] [--config.k=v ...] [--dry-run]

Steps, each a `gcloud` command that `--dry-run` prints instead of running:

1. Provision (optional): `--create` makes the slice with `gcloud compute tpus tpu-vm create`;
   `--queued` asks for it through a queued resource (`gcloud compute tpus queued-resources
   create`, waiting until it is ACTIVE). `--spot` makes either a Spot (preemptible) slice. Without
   either flag the slice `--name` must already exist.
2. Set up every worker (`--worker=all`): copy the config's directory (config files may import
   their neighbours) into `~/lm_launch/`, and `pip install` the package (a pip requirement such
   as a git URL, or a local wheel copied over first) next to `jax[tpu]`.
3. Run the same `lm train` command on all workers at once with
   `gcloud compute tpus tpu-vm ssh NAME --worker=all --command ...`, with `LM_DISTRIBUTED=1`:
   JAX detects the TPU slice topology itself and `jax.distributed.initialize()` needs no
   addresses. Each worker appends its output to `~/lm_launch/logs/RUN-$(hostname).log`, and
   `--output-directory` keeps a local copy of each worker's output per attempt under `--log-dir`.
4. On failure, check the slice's state. A preempted slice (anything but READY) is deleted,
   re-created and set up again when this launcher provisioned it; then `lm train` runs again on
   the same workdir and resumes from its latest checkpoint, up to `--restarts` times. The workdir
   must therefore outlive the VMs and be the same on every worker: a shared mount (Filestore/NFS,
   or a GCS bucket mounted with gcsfuse at the same path), not a worker's local disk.
5. Collect the workers' log files with `gcloud compute tpus tpu-vm scp --worker=all`, and with
   `--delete-after` delete the slice.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

from launch import common

REMOTE_DIR = 'lm_launch'  # relative to the remote home directory


def add_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group('TPU')
  g.add_argument('--name', required=True, help='TPU VM (node) name; also the queued resource id')
  g.add_argument('--zone', required=True)
  g.add_argument('--project', default=None)
  g.add_argument('--accelerator-type', default=None, help='e.g. v4-32, v5litepod-16, v5p-64')
  g.add_argument('--runtime-version', default='tpu-ubuntu2204-base')
  prov = g.add_mutually_exclusive_group()
  prov.add_argument('--create', action='store_true', help='create the slice (tpu-vm create)')
  prov.add_argument('--queued', action='store_true', help='request it as a queued resource')
  g.add_argument('--spot', action='store_true', help='Spot (preemptible) capacity')
  g.add_argument('--install', default=None,
                 help='pip requirement (e.g. git+https://github.com/ORG/lm@main) or a local .whl; '
                      'omit if the workers already have lm installed')
  g.add_argument('--tpu-python', default='python3', help='interpreter on the workers')
  g.add_argument('--env', action='append', default=[], metavar='KEY=VALUE',
                 help='extra environment for lm train on the workers (repeatable)')
  g.add_argument('--restarts', type=int, default=3,
                 help='re-runs after a failure or preemption (resuming from the workdir)')
  g.add_argument('--log-dir', default=None, help='local folder for worker logs (default logs/NAME)')
  g.add_argument('--delete-after', action='store_true', help='delete the slice when done')
  g.add_argument('--poll-seconds', type=int, default=60, help='queued resource polling interval')


class Tpu:
  """The gcloud commands for one slice."""

  def __init__(self, opts):
    self.o = opts
    self.loc = [f'--zone={opts.zone}'] + ([f'--project={opts.project}'] if opts.project else [])

  # Provisioning.
  def create(self) -> list[list[str]]:
    o = self.o
    if not o.accelerator_type:
      raise SystemExit('--create/--queued need --accelerator-type')
    spot = ['--spot'] if o.spot else []
    if o.queued:
      return [['gcloud', 'compute', 'tpus', 'queued-resources', 'create', o.name,
               f'--node-id={o.name}', *self.loc, f'--accelerator-type={o.accelerator_type}',
               f'--runtime-version={o.runtime_version}', *spot]]
    return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', o.name, *self.loc,
             f'--accelerator-type={o.accelerator_type}', f'--version={o.runtime_version}', *spot]]

  def queued_state(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'queued-resources', 'describe', self.o.name, *self.loc,
            '--format', 'value(state.state)']

  def state(self) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'describe', self.o.name, *self.loc,
            '--format', 'value(state)']

  def delete(self) -> list[list[str]]:
    if self.o.queued:
      return [['gcloud', 'compute', 'tpus', 'queued-resources', 'delete', self.o.name, *self.loc,
               '--force', '--quiet']]
    return [['gcloud', 'compute', 'tpus', 'tpu-vm', 'delete', self.o.name, *self.loc, '--quiet']]

  # Running things on workers.
  def ssh(self, command: str, output_dir: str | None = None) -> list[str]:
    out = [f'--output-directory={output_dir}'] if output_dir else []
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', self.o.name, *self.loc, '--worker=all',
            '--command', command, *out]

  def scp_to(self, local: str, remote: str, recurse=False) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', *(['--recurse'] if recurse else []),
            local, f'{self.o.name}:{remote}', *self.loc, '--worker=all']

  def scp_from(self, remote: str, local: str) -> list[str]:
    return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'scp', f'{self.o.name}:{remote}', local,
            *self.loc, '--worker=all']

  def setup(self, config: str) -> list[list[str]]:
    """Copies the config directory (and wheel) to every worker and installs the package."""
    o = self.o
    config_dir = os.path.dirname(os.path.normpath(config.partition(':')[0]))
    if not config_dir:
      raise SystemExit(f'--config {config}: keep config files in a folder (e.g. configs/); the '
                       'launcher copies that folder to the workers')
    cmds = [self.ssh(f'mkdir -p {REMOTE_DIR}/logs'),
            self.scp_to(config_dir, f'{REMOTE_DIR}/', recurse=True)]
    if o.install:
      spec = o.install
      if spec.endswith('.whl'):
        cmds.append(self.scp_to(spec, f'{REMOTE_DIR}/'))
        spec = f'{REMOTE_DIR}/{os.path.basename(spec)}'
      cmds.append(self.ssh(f'{o.tpu_python} -m pip install -U "jax[tpu]" {shlex.quote(spec)}'))
    return cmds

  def train(self, config: str, run: common.Run) -> str:
    """The shell command every worker runs."""
    path, sep, arg = config.partition(':')
    path = os.path.normpath(path)
    remote_config = os.path.join(os.path.basename(os.path.dirname(path)),
                                 os.path.basename(path)) + sep + arg
    env = {'LM_DISTRIBUTED': '1'}
    for kv in self.o.env:
      k, _, v = kv.partition('=')
      env[k] = v
    argv = common.train_command(remote_config, run.workdir, run.overrides, python=self.o.tpu_python)
    return (f'cd {REMOTE_DIR} && {common.env_prefix(env)}{common.join(argv)} 2>&1 '
            f'| tee -a logs/{shlex.quote(run.name)}-$(hostname).log; exit ${{PIPESTATUS[0]}}')

  def run(self, config: str, run: common.Run, attempt: int = 0) -> list[str]:
    return self.ssh(self.train(config, run), output_dir=self.attempt_log_dir(run, attempt))

  def log_dir(self, run: common.Run) -> str:
    return self.o.log_dir or os.path.join('logs', self.o.name)

  def attempt_log_dir(self, run: common.Run, attempt: int) -> str:
    return os.path.join(self.log_dir(run), f'{run.name}-attempt{attempt}')

  def collect(self, run: common.Run) -> list[str]:
    return self.scp_from(f'{REMOTE_DIR}/logs/*', self.log_dir(run) + '/')


def dry_run_lines(opts, config: str, runs: list[common.Run], provision=True, teardown=True):
  t = Tpu(opts)
  out = []
  if not runs[0].workdir.startswith('/'):
    out.append(f'# warning: workdir {runs[0].workdir} is relative: it would sit on each worker\'s '
               'own disk, which a preemption loses; use a shared mount')
  if provision and (opts.create or opts.queued):
    out += [common.join(c) for c in t.create()]
    if opts.queued:
      out.append(f'# poll until ACTIVE: {common.join(t.queued_state())}')
  if provision:
    out += [common.join(c) for c in t.setup(config)]
  for run in runs:
    out.append(f'mkdir -p {shlex.quote(t.attempt_log_dir(run, 0))}')
    out.append(common.join(t.run(config, run)))
    recover = ('delete, re-create and set up the slice, then ' if (opts.create or opts.queued)
               else '')
    out.append(f'# on failure, up to {opts.restarts} times: {common.join(t.state())}; '
               f'if not READY: {recover}re-run (resumes from {run.workdir})')
    out.append(common.join(t.collect(run)))
  if teardown and opts.delete_after:
    out += [common.join(c) for c in t.delete()]
  return out


def _capture(cmd) -> str:
  r = common.run(cmd, capture=True)
  return r.stdout.strip() if r.returncode == 0 else ''


def provision(opts, config: str) -> None:
  t = Tpu(opts)
  if opts.create or opts.queued:
    for c in t.create():
      common.run(c, check=True)
    if opts.queued:
      while (state := _capture(t.queued_state())) != 'ACTIVE':
        if state in ('FAILED', 'SUSPENDED'):
          raise SystemExit(f'queued resource {opts.name} is {state}')
        print(f'[launch.tpu] queued resource {opts.name}: {state or "?"}; waiting', flush=True)
        time.sleep(opts.poll_seconds)
  for c in t.setup(config):
    common.run(c, check=True)


def run_one(opts, config: str, run: common.Run) -> int:
  """Runs one training run on the slice, recovering from preemptions."""
  t = Tpu(opts)
  rc = 1
  for attempt in range(opts.restarts + 1):
    if attempt:
      state = _capture(t.state())
      print(f'[launch.tpu] attempt {attempt} failed (exit {rc}); slice state {state or "?"}',
            flush=True)
      if state != 'READY':
        if not (opts.create or opts.queued):
          print('[launch.tpu] slice is not READY and was not created by this launcher; '
                'recreate it (or pass --create/--queued) and run again', flush=True)
          return rc
        for c in t.delete():
          common.run(c)
        provision(opts, config)
    os.makedirs(t.attempt_log_dir(run, attempt), exist_ok=True)
    rc = common.run(t.run(config, run, attempt)).returncode
    if rc == 0:
      break
  common.run(t.collect(run))
  return rc


def launch(opts, config: str, runs: list[common.Run]) -> int:
  provision(opts, config)
  rc = 0
  try:
    for run in runs:
      rc = run_one(opts, config, run) or rc
  finally:
    if opts.delete_after:
      for c in Tpu(opts).delete():
        common.run(c)
  return rc


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m launch.tpu', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              allow_abbrev=False)
  p.add_argument('--config', required=True, help='configs/NAME.py[:arg] (path on this machine)')
  p.add_argument('--workdir', required=True,
                 help='a path on a mount every worker shares (NFS, gcsfuse), so that it outlives the VMs')
  p.add_argument('--dry-run', action='store_true', help='print the gcloud commands; run nothing')
  add_args(p)
  args, rest = p.parse_known_args(argv)
  overrides, unknown = common.split_overrides(rest)
  if unknown:
    p.error(f'unrecognized arguments: {" ".join(unknown)}')
  if '://' in args.workdir:
    p.error(f'--workdir {args.workdir} is a URL; lm train writes through the file system: mount the '
            'bucket with gcsfuse at the same path on every worker and pass that path')
  runs = [common.Run(os.path.basename(args.workdir.rstrip('/')), args.workdir, overrides)]
  if args.dry_run:
    print('\n'.join(dry_run_lines(args, args.config, runs)))
    return 0
  return launch(args, args.config, runs)


if __name__ == '__main__':
  sys.exit(main())
