"""Errors a user can fix, faults that stop a run, and the exit codes `lm` returns for each.

The CLI prints either kind as one line and exits with the code below (docs/reliability.md);
anything else is a bug: one line naming the file that holds its traceback (exit 1).
"""

import json

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: one line, the traceback in a file; please report it
EXIT_USER_ERROR = 2  # bad config, data, checkpoint or command line; nothing was trained or written
EXIT_DIVERGED = 3  # train.max_bad_steps consecutive non-finite or spiking steps; no checkpoint written
EXIT_PREEMPTED = 75  # SIGTERM/SIGINT: checkpoint written, rerun the same command to resume (EX_TEMPFAIL)
EXIT_GRACE_EXPIRED = 76  # SIGTERM/SIGINT, but the checkpoint did not finish within train.grace_seconds


class UserError(Exception):
  """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
  """A config key, value or combination that cannot run."""


class DataError(UserError):
  """Missing, empty or malformed training data."""


class CheckpointError(UserError):
  """A checkpoint that cannot be read or does not fit the model."""


class RunStopped(Exception):
  """The run stopped early for a reason that is not a bug; `exit_code` says which."""
  exit_code = EXIT_BUG


class Preempted(RunStopped):
  """A stop signal arrived; a checkpoint of the step reached was written."""
  exit_code = EXIT_PREEMPTED


class Diverged(RunStopped):
  """Too many consecutive steps were skipped by the numerical guard."""
  exit_code = EXIT_DIVERGED


def read_json(path: str, what: str = 'file', error=None) -> dict:
  """A JSON object from `path`, or `error` (default UserError) with one line saying what is wrong
  with the file: the one reader of JSON files that users hand lm (run, HF and PEFT configs)."""
  error = error or UserError
  try:
    with open(path, encoding='utf-8') as f:
      value = json.load(f)
  except FileNotFoundError:
    raise error(f'{what} {path} not found') from None
  except (OSError, UnicodeDecodeError) as e:
    raise error(f'{what} {path} cannot be read ({getattr(e, "strerror", None) or e})') from None
  except json.JSONDecodeError as e:
    raise error(f'{what} {path} is not valid JSON (line {e.lineno}: {e.msg}); restore or '
                'rewrite it') from None
  if not isinstance(value, dict):
    raise error(f'{what} {path} holds a JSON {type(value).__name__}, not an object')
  return value
