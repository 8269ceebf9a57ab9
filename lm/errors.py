"""Errors a user can fix. The CLI prints them as one line and exits non-zero; nothing else does."""


class UserError(Exception):
  """Bad input: the message says what is wrong and how to fix it."""


class ConfigError(UserError):
  """A config key, value or combination that cannot run."""


class DataError(UserError):
  """Missing, empty or malformed training data."""


class CheckpointError(UserError):
  """A checkpoint that cannot be read or does not fit the model."""
