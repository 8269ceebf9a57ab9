"""Trainable partitions: which parameters train. One label per parameter, used twice.

The labels decide both what the gradient is taken against (lm/train/step.py splits the parameters by
label and differentiates only the trainable part) and what the optimizer updates
(`optax.multi_transform` with `set_to_zero` for frozen, lm/train/optim.py), so frozen weights get no
gradient and no optimizer state. Every fine-tuning mode is a value of `train.trainable`:

  all                     every parameter (pretraining, full fine-tuning)
  lora                    the LoRA adapters only (model.lora.rank > 0)
  bitfit                  biases only (models with biases, e.g. Qwen2's q/k/v biases)
  norms                   RMSNorm scales only
  freeze_embeddings       everything but the input embedding table
  freeze_first_layers:N   everything but transformer layers 0..N-1
  regex:<pattern>         parameters whose name matches (re.search)

`ref.*` parameters (DPO's frozen reference copy), `teacher.*` ones (a distillation teacher) and
the sigmoid router's correction bias (moved by the step's balancing update, not by the gradient:
lm/train/balancing.py) are frozen whatever the value.

Layers are stacked: `layers.attn.q.kernel` is one [L, D, H, K] array, so "the first N layers" is
not a set of names. `freeze_first_layers:N` labels the stacked arrays trainable and adds a
per-layer row mask that lm/train/optim.py applies to the gradient (before clipping) and to the update
(after weight decay), so rows 0..N-1 stay bit-identical. The price, said plainly: those rows still
get weight gradients and Adam moments. Splitting each stacked array in two would save them, at
the cost of a second parameter layout; LoRA is the partition for saving memory.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from lm.errors import ConfigError
from lm.model.lora import is_adapter
from lm.model.quant import SCALE_SUFFIX
from lm.model.spec import FROZEN_COPIES

TRAINABLE, FROZEN = 'trainable', 'frozen'
NOT_TRAINED = ('layers.moe.correction_bias',)  # state the step updates outside the gradient
LAYERS_PREFIX = 'layers.'


# name -> predicate over the flat parameter name (e.g. 'layers.attn.q.kernel').
PARTITIONS: dict[str, Callable[[str], bool]] = {
    'all': lambda name: True,
    'lora': is_adapter,
    'bitfit': lambda name: name.endswith('.bias'),
    'norms': lambda name: name.endswith('norm.scale'),
    'freeze_embeddings': lambda name: name != 'embed',
}
_FIRST_LAYERS = 'freeze_first_layers:'


def _regex(pattern: str) -> Callable[[str], bool]:
  compiled = re.compile(pattern)
  return lambda name: compiled.search(name) is not None


def _first_layers(spec: str) -> int | None:
  if not spec.startswith(_FIRST_LAYERS):
    return None
  n = spec[len(_FIRST_LAYERS):]
  if not n.isdigit():
    raise ConfigError(f'train.trainable={spec!r}: write freeze_first_layers:N with N an integer')
  return int(n)


def predicate(spec: str) -> Callable[[str], bool]:
  """A partition by name (`all`, `lora`, ...) or `regex:<pattern>` over parameter names."""
  if spec.startswith('regex:'):
    return _regex(spec[len('regex:'):])
  if _first_layers(spec) is not None:
    return PARTITIONS['all']
  if spec not in PARTITIONS:
    raise ConfigError(f'train.trainable={spec!r} is not a known partition; choose one of '
                      f'{sorted(PARTITIONS) + [_FIRST_LAYERS + "N"]} or regex:<pattern>')
  return PARTITIONS[spec]


def labels(param_names, spec: str) -> dict[str, str]:
  """{parameter name: 'trainable' | 'frozen'}."""
  is_trainable = predicate(spec)
  out = {name: TRAINABLE if is_trainable(name) and not name.startswith(FROZEN_COPIES)
         and name not in NOT_TRAINED else FROZEN for name in param_names}
  if TRAINABLE not in out.values():
    hint = {'lora': '; set model.lora.rank > 0 to add adapters',
            'bitfit': '; this model has no biases (Qwen2-style q/k/v biases: model.qkv_bias=True)'}
    raise ConfigError(f'train.trainable={spec!r} selects no parameters, so nothing would train'
                      + hint.get(spec, '; match the pattern against names such as '
                                       'layers.attn.q.kernel'))
  return out


def trains_base(param_names, spec: str) -> bool:
  """Whether partition `spec` trains any weight that is not a LoRA adapter (or a frozen copy)."""
  return any(label == TRAINABLE and not is_adapter(name)
             for name, label in labels(param_names, spec).items())


def layer_masks(shapes: dict, spec: str, rows=None) -> dict[str, np.ndarray]:
  """{stacked parameter name: bool [rows] that train}, for partitions finer than a name.

  rows(name): the model layer of each row of a stacked parameter (lm.model.stack.layer_rows:
  in a hybrid stack `layers.linear_attn.*` row j is not layer j); None: row j is layer j."""
  n = _first_layers(spec)
  if not n:
    return {}
  out = {}
  for name, shape in shapes.items():
    if name.startswith(LAYERS_PREFIX):
      out[name] = np.asarray(rows(name) if rows else np.arange(shape.shape[0]))
  n_layers = max((int(layers.max()) + 1 for layers in out.values() if layers.size), default=0)
  if n >= n_layers:
    raise ConfigError(f'train.trainable={spec!r} freezes all {n_layers} layers; use regex: to '
                      'train only the embeddings or head')
  return {name: layers >= n for name, layers in out.items()}


def trainable_count(shapes: dict, label_of: dict, masks: dict) -> tuple[int, int]:
  """(trainable, total) parameter counts; the `ref.*` copy and a teacher count in neither."""
  trainable = total = 0
  for name, s in shapes.items():
    if name.startswith(FROZEN_COPIES) or name.endswith(SCALE_SUFFIX):  # QLoRA's scales: not weights
      continue
    size = int(np.prod(s.shape))
    total += size
    if label_of[name] == TRAINABLE:
      trainable += size * float(np.mean(masks[name])) if name in masks else size
  return int(trainable), total


def split(params: dict, label_of: dict) -> tuple[dict, dict]:
  trainable = {k: v for k, v in params.items() if label_of[k] == TRAINABLE}
  frozen = {k: v for k, v in params.items() if label_of[k] != TRAINABLE}
  return trainable, frozen
