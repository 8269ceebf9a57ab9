"""Errors a user can fix, faults that stop a run, and the exit codes `lm` returns for each.

The CLI prints either kind as one line and exits with the code below (docs/reliability.md);
anything else is a bug and keeps its traceback (exit 1).
"""

EXIT_OK = 0
EXIT_BUG = 1  # an unexpected exception: a traceback, please report it
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
