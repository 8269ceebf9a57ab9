"""Verifiable rewards for GRPO (lm/train/grpo_loop.py): fn(completion, record) -> float.

`grpo.rewards` names them by dotted path, so a reward of your own is any importable function of
the same shape, e.g. `mypackage.rewards.unit_tests`. `record` is the prompt's source record (for
GSM8K: {question, answer}); `completion` the sampled text, cut at the first stop string.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re

import numpy as np

from lm.errors import ConfigError, UserError
from lm.eval.text_metrics import extract_answer

_FINAL = re.compile(r'####\s*(-?[\d,]*\.?\d+)')


def gsm8k_exact(completion: str, record: dict) -> float:
  """1 if the completion's final answer (after `####`, else its last number) equals the record's
  GSM8K answer, else 0."""
  gold = extract_answer(record['answer'])
  return float(gold != '' and extract_answer(completion) == gold)


def answer_format(completion: str, record: dict) -> float:
  """1 if the completion ends its reasoning with a GSM8K-style `#### <number>` line, else 0."""
  del record
  return float(_FINAL.search(completion) is not None)


def brevity(completion: str, record: dict, *, chars: int = 400) -> float:
  """1 for an empty completion falling linearly to 0 at `chars` characters: a length penalty to
  add with a small weight (grpo.reward_weights)."""
  del record
  return max(0.0, 1.0 - len(completion) / chars)


def resolve(names: str):
  """[(name, fn)] from comma-separated dotted names; a name that does not resolve is a
  ConfigError naming it."""
  out = []
  for name in (n.strip() for n in names.split(',') if n.strip()):
    module_name, _, attr = name.rpartition('.')
    try:
      fn = getattr(importlib.import_module(module_name), attr, None) if module_name else None
    except ImportError:
      fn = None
    if not callable(fn):
      raise ConfigError(f'grpo.rewards: {name!r} does not name a function; give dotted paths such '
                        'as lm.eval.rewards.gsm8k_exact,lm.eval.rewards.answer_format')
    out.append((name, fn))
  if not out:
    raise ConfigError('grpo.rewards is empty; name at least one reward function, e.g. '
                      'lm.eval.rewards.gsm8k_exact')
  return out



def score(reward_fns, completions: list[str], records: list, record_ids: list[int]) -> np.ndarray:
  """[sample, reward] of every reward function on every completion, each value checked: a reward
  that raises, returns a non-number or a non-finite number stops the run with one line naming the
  function and the sample, since a NaN advantage would train silently to the end."""
  out = np.zeros((len(completions), len(reward_fns)), np.float64)
  for b, (text, record, rid) in enumerate(zip(completions, records, record_ids)):
    for j, (name, fn) in enumerate(reward_fns):
      sample = f'sample {b} (prompt record {rid}, completion {text[:40]!r}{"..." if len(text) > 40 else ""})'
      try:
        value = fn(text, record)
      except Exception as e:  # pylint: disable=broad-except  # the user's function, the user's error
        raise UserError(f'grpo reward {name} raised {type(e).__name__}: '
                        f'{(str(e).splitlines() or [""])[0][:120]} on {sample}; fix the reward '
                        'function') from None
      if isinstance(value, (str, bytes)) or not isinstance(value, numbers.Real):
        raise UserError(f'grpo reward {name} returned {type(value).__name__} {value!r:.40} on '
                        f'{sample}; a reward must return a number')
      if not math.isfinite(float(value)):
        raise UserError(f'grpo reward {name} returned {float(value)} on {sample}; a reward must '
                        'return a finite number')
      out[b, j] = float(value)
  return out
