"""lm run directories: what `lm train --workdir` wrote, read back."""

from __future__ import annotations

import json
import os

import ml_collections

from lm import config as config_lib
from lm.errors import UserError


def load_config(run_dir: str) -> ml_collections.ConfigDict:
  """The run's resolved config over today's defaults, so a run saved before a key existed loads
  with that key's default (which is the behaviour it was trained with)."""
  path = os.path.join(run_dir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{run_dir} is not a run directory (no config.json); pass what `lm train '
                    '--workdir` wrote')
  with open(path, encoding='utf-8') as f:
    saved = json.load(f)
  cfg = config_lib.base_config()
  _merge(cfg, saved)
  return cfg


def _as_tuple(value):
  return tuple(_as_tuple(v) for v in value) if isinstance(value, list) else value


def _merge(node: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if key in node and isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
      _merge(node[key], value)
    elif key in node and isinstance(node[key], tuple):
      node[key] = _as_tuple(value)  # JSON wrote tuples as lists
    else:
      node[key] = value
