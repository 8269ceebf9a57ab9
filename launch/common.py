"""Helpers shared by the launchers: the `lm train` command line, overrides, quoting, running."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from typing import Iterable, Mapping, Sequence

from lm import config as config_lib
from lm.errors import UserError

Overrides = Sequence[tuple[str, object]]


def format_value(value) -> str:
  """An override value as `lm train` parses it (`--config.a.b=<this>`)."""
  if isinstance(value, bool):
    return 'true' if value else 'false'
  if isinstance(value, str):
    return value
  if isinstance(value, float):
    return repr(value)  # shortest round-tripping form: 0.001, 0.0003, 1e-05
  return repr(value)  # ints, tuples, lists, None


def normalize_key(key: str) -> str:
  """`config.optimizer.lr` and `optimizer.lr` both name the override `optimizer.lr`."""
  return key[len('config.'):] if key.startswith('config.') else key


def override_args(overrides: Overrides) -> list[str]:
  return [f'--config.{normalize_key(k)}={format_value(v)}' for k, v in overrides]


def split_overrides(args: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
  """Separates `--config.a.b=v` / `--config.a.b v` arguments from everything else (lm.config's
  parser, so launchers and `lm train` read overrides the same way)."""
  try:
    return config_lib.split_overrides(list(args))
  except UserError as e:
    raise SystemExit(str(e)) from None


def check_config(config: str, overrides: Overrides = (), what: str = '') -> None:
  """Loads and validates `config` with `overrides` here, as `lm train` will, so a bad value stops
  the launch before any job is submitted."""
  try:
    config_lib.load_config(config, [(normalize_key(k), v) for k, v in overrides])
  except UserError as e:
    raise SystemExit(f'{what}{e}') from None


def train_command(config: str, workdir: str, overrides: Overrides = (),
                  python: str | Sequence[str] | None = None) -> list[str]:
  """`<python> -m lm train --config CONFIG --workdir WORKDIR --config.k=v ...` as an argv list.

  `python` is the interpreter on the machine that runs it: this one's (`sys.executable`) by
  default; launchers for other machines pass `python3` or a virtualenv's interpreter.
  """
  if python is None:
    python = [sys.executable]
  elif isinstance(python, str):
    python = shlex.split(python)
  return [*python, '-m', 'lm', 'train', '--config', config, '--workdir', workdir,
          *override_args(overrides)]


def join(argv: Iterable[str]) -> str:
  return shlex.join(list(argv))


def env_prefix(env: Mapping[str, str]) -> str:
  """`A=1 B=2 ` for a shell command line (empty when there is no environment to set)."""
  return ''.join(f'{k}={shlex.quote(str(v))} ' for k, v in env.items())


def run(argv: Sequence[str], *, env: Mapping[str, str] | None = None, log: str | None = None,
        check: bool = False, capture: bool = False) -> subprocess.CompletedProcess:
  """Runs argv, echoing it first; with `log`, output also goes (appended) to that file."""
  print('+', env_prefix(env or {}) + join(argv), flush=True)
  full_env = {**os.environ, **(env or {})}
  if capture:
    return subprocess.run(argv, env=full_env, check=check, text=True, capture_output=True)
  if log is None:
    return subprocess.run(argv, env=full_env, check=check)
  os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
  with open(log, 'ab') as f:
    proc = subprocess.Popen(argv, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for chunk in iter(lambda: proc.stdout.readline(), b''):
      sys.stdout.buffer.write(chunk)
      sys.stdout.flush()
      f.write(chunk)
      f.flush()
    proc.wait()
  result = subprocess.CompletedProcess(argv, proc.returncode)
  if check:
    result.check_returncode()
  return result


@dataclasses.dataclass
class Run:
  """One training run: a name, its workdir and its config overrides (`(key, value)` pairs)."""
  name: str
  workdir: str
  overrides: list = dataclasses.field(default_factory=list)
