"""Trainable partitions: which parameters train. One label per parameter, used twice.

The labels decide both what the gradient is taken against (lm/step.py splits the parameters by
label and differentiates only the trainable part) and what the optimizer updates
(`optax.multi_transform` with `set_to_zero` for frozen, lm/optim.py), so frozen weights get no
gradient and no optimizer state. Pretraining uses `all`; fine-tuning modes add partitions here,
never branches in the step.
"""

from __future__ import annotations

import re
from typing import Callable

from lm.errors import ConfigError

TRAINABLE, FROZEN = 'trainable', 'frozen'

# name -> predicate over the flat parameter name (e.g. 'layers.attn.q.kernel').
PARTITIONS: dict[str, Callable[[str], bool]] = {
    'all': lambda name: True,
}


def _regex(pattern: str) -> Callable[[str], bool]:
  compiled = re.compile(pattern)
  return lambda name: compiled.search(name) is not None


def predicate(spec: str) -> Callable[[str], bool]:
  """A partition by name (`all`, ...) or `regex:<pattern>` over parameter names."""
  if spec.startswith('regex:'):
    return _regex(spec[len('regex:'):])
  if spec not in PARTITIONS:
    raise ConfigError(f'train.trainable={spec!r} is not a known partition; choose one of '
                      f'{sorted(PARTITIONS)} or regex:<pattern>')
  return PARTITIONS[spec]


def labels(param_names, spec: str) -> dict[str, str]:
  """{parameter name: 'trainable' | 'frozen'}."""
  is_trainable = predicate(spec)
  out = {name: TRAINABLE if is_trainable(name) else FROZEN for name in param_names}
  if TRAINABLE not in out.values():
    raise ConfigError(f'train.trainable={spec!r} selects no parameters, so nothing would train; '
                      'match the pattern against names such as layers.attn.q.kernel')
  return out


def split(params: dict, label_of: dict) -> tuple[dict, dict]:
  trainable = {k: v for k, v in params.items() if label_of[k] == TRAINABLE}
  frozen = {k: v for k, v in params.items() if label_of[k] != TRAINABLE}
  return trainable, frozen
