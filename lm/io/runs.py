"""THE run-directory reader: a run's config, its tokenizer and the parameters of a checkpoint, for
resume, `lm generate`, `lm eval`, `lm compare`, `lm export` and `train.init_from` alike.

One behaviour everywhere:
- A missing or broken `config.json`, a missing tokenizer, an unreadable checkpoint: one line
  (UserError / CheckpointError), never a traceback.
- An unreadable newest checkpoint falls back to the previous good one, with a warning (training
  also moves it aside, lm/train/checkpoint.py; readers never change another run's files).
- A partial run (LoRA, norms, ...) saves only what it trains; the frozen rest is rebuilt the way
  that run built it: from its own `train.init_from`, or from its seed when it started from scratch.
"""

from __future__ import annotations

import glob
import os

import jax
import ml_collections
import orbax.checkpoint as ocp

from lm import config as config_lib
from lm.data import tokenizer as tokenizer_lib
from lm.errors import CheckpointError, ConfigError, UserError, read_json
from lm.io import gguf as gguf_io
from lm.io import hf
from lm.model import lora
from lm.train import checkpoint as checkpoint_lib
from lm.model.lora import is_adapter
from lm.model.spec import FROZEN_COPIES
from lm.train.state import ModelSpec

CONFIG = 'config.json'
TOKENIZER = 'tokenizer.model'


def kind(path: str, what: str = 'train.init_from') -> str:
  """'lm' (a run directory with checkpoints), 'hf' (config.json + *.safetensors) or 'gguf' (a .gguf
  file, or a directory holding one)."""
  if os.path.isfile(path) and path.endswith('.gguf'):
    return 'gguf'
  if not os.path.isdir(path):
    raise ConfigError(f'{what}={path!r} does not exist or is not a directory; name an lm run '
                      'directory, a Hugging Face model directory or a .gguf file')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return 'lm'
  if os.path.isfile(os.path.join(path, CONFIG)) and glob.glob(os.path.join(path, '*.safetensors')):
    return 'hf'
  if gguf_io.find_file(path):
    return 'gguf'
  raise ConfigError(f'{what}={path!r} is neither an lm run directory (with checkpoints/), '
                    'a Hugging Face model directory (config.json + *.safetensors) nor a directory '
                    'holding a .gguf file')


def is_hf_directory(path: str) -> bool:
  """Whether `path` holds weights without a run: a Hugging Face directory or a GGUF file."""
  try:
    return kind(path) in ('hf', 'gguf')
  except ConfigError:  # neither kind: load_config says what a run directory needs
    return False


def run_config(run_dir: str) -> dict:
  """The run's config.json as written (a dict with at least its `model` section)."""
  path = os.path.join(run_dir, CONFIG)
  if not os.path.isfile(path):
    raise UserError(f'{run_dir} is not a run directory (no config.json); pass what `lm train '
                    '--workdir` wrote')
  saved = read_json(path, 'run config', CheckpointError)
  if not isinstance(saved.get('model'), dict) or not isinstance(saved.get('train', {}), dict):
    raise CheckpointError(f'run config {path} has no model section; it is not what `lm train` wrote')
  return saved


def load_config(run_dir: str) -> ml_collections.ConfigDict:
  """The run's resolved config over today's defaults, so a run saved before a key existed loads
  with that key's default (which is the behaviour it was trained with)."""
  cfg = config_lib.base_config()
  try:
    _merge(cfg, run_config(run_dir))
  except (TypeError, ValueError, AttributeError) as e:
    raise CheckpointError(f'run config {os.path.join(run_dir, CONFIG)} does not fit lm\'s config '
                          f'({e}); it was not written by this version of lm') from None
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


def tokenizer_file(run_dir: str, saved: dict | None = None) -> str | None:
  """The run's own trained tokenizer.model, else what its config named (a file or a HF folder)."""
  own = os.path.join(run_dir, TOKENIZER)
  if os.path.isfile(own):
    return own
  saved = run_config(run_dir) if saved is None else saved
  return (saved.get('data') or {}).get('tokenizer') or None


def run_tokenizer(run_dir: str, cfg=None):
  """The tokenizer the run trained with, or a UserError naming what is missing."""
  named = tokenizer_file(run_dir, None if cfg is None else {'data': {'tokenizer': cfg.data.tokenizer}})
  if not named:
    raise UserError(f'run {run_dir} has no {TOKENIZER} and its config names no data.tokenizer; '
                    'copy the tokenizer it was trained with into it')
  if not os.path.exists(named):
    raise UserError(f'run {run_dir} has no {TOKENIZER} and the tokenizer its config names '
                    f'({named}) does not exist; put it back or copy it into the run as {TOKENIZER}')
  return tokenizer_lib.load(named)


# --- Parameters --------------------------------------------------------------------------------

def checkpoint_steps(run_dir: str) -> list[int]:
  """Complete checkpoint steps, newest first (Orbax renames a step's directory when it is whole)."""
  directory = os.path.join(run_dir, 'checkpoints')
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)


def _read_step(directory: str, step: int, plan):
  """{name: array} of checkpoint `step`: `plan(saved)` maps the saved parameters' metadata to the
  {name: (ShapeDtypeStruct, ArrayRestoreArgs)} to read. Raises checkpoint_lib.Unreadable."""
  with checkpoint_lib.quiet_orbax():
    return _read_step_quietly(directory, step, plan)


def _read_step_quietly(directory: str, step: int, plan):
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False), item_handlers={
          'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()})
  try:
    try:
      saved = manager.item_metadata(step).state
      saved = getattr(saved, 'tree', saved)['params']
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint_lib.Unreadable(f'its metadata cannot be read: {checkpoint_lib.first_line(e)}') from None
    targets = plan(saved)
    item = {'params': {n: t for n, (t, _) in targets.items()}}
    args = {'params': {n: a for n, (_, a) in targets.items()}}
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item=item, restore_args=args, partial_restore=True)))
    except Exception as e:  # pylint: disable=broad-except
      raise checkpoint_lib.Unreadable(checkpoint_lib.first_line(e)) from None
    return restored.state['params']
  finally:
    manager.close()


def read_params(run_dir: str, plan, step: int | None = None) -> tuple[dict, int]:
  """(params, step) of `step`, or of the newest readable checkpoint: an unreadable one is reported
  and the previous one read (the same fallback as resuming a run)."""
  directory = os.path.join(os.path.abspath(run_dir), 'checkpoints')  # orbax wants absolute paths
  steps = checkpoint_steps(run_dir)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f'no checkpoint {step} in {directory}; have {sorted(steps)}')
    steps = [step]
  if not steps:
    raise CheckpointError(f'{directory} holds no checkpoint')

  def unreadable(s, reason):
    if step is not None:
      raise CheckpointError(f'checkpoint step {s} in {directory} is unreadable ({reason}); '
                            'name another step') from None
    checkpoint_lib.warn(f'checkpoint step {s} in {directory} is unreadable ({reason}); '
                        'reading the previous checkpoint')

  return checkpoint_lib.first_readable(steps, lambda s: (_read_step(directory, s, plan), s),
                                       unreadable, directory)


def _rebuild_missing(run_dir: str, saved: dict, missing: list[str], spec: ModelSpec,
                     shardings: dict) -> dict:
  """The frozen parameters a partial run did not save, built as that run built them."""
  run_spec = ModelSpec(ml_collections.ConfigDict(saved['model']))
  if any(n not in run_spec.shapes for n in missing):
    raise CheckpointError(f'{run_dir}: parameter {missing[0]!r} is not in its checkpoints; the run '
                          'has another model')
  source = (saved.get('train') or {}).get('init_from')
  if source:
    return load_params(source, ModelSpec(lora.without_adapters(spec.cfg)), shardings)
  seed = (saved.get('train') or {}).get('seed', 0)
  init = jax.jit(lambda rng: {n: v for n, v in run_spec.init(rng).items() if n in missing},
                 out_shardings={n: shardings[n] for n in missing})
  return init(jax.random.key(seed))


def restore_params(run_dir: str, cfg, spec: ModelSpec, shardings: dict, step: int | None = None):
  """(params, step): every parameter `spec` names (adapters unmerged), in `shardings`, from the
  checkpoint `step` (default: the newest readable), without the optimizer state."""
  del cfg  # the run's own config.json says how its frozen part was built
  saved = run_config(run_dir)

  def plan(meta):
    return {n: (jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[n]),
                ocp.ArrayRestoreArgs(sharding=shardings[n], dtype=s.dtype))
            for n, s in spec.shapes.items() if n in meta}

  params, step = read_params(run_dir, plan, step)
  missing = [n for n in spec.names if n not in params]
  if missing:
    base = _rebuild_missing(run_dir, saved, missing, spec, shardings)
    params = {**{n: base[n] for n in missing}, **params}
  return params, step


def base_params(run_dir: str, spec: ModelSpec, shardings: dict, *, merge: bool = True):
  """The base weights `spec` needs as run `run_dir` last saved them (newest readable checkpoint),
  with its LoRA adapters merged; `merge=False` returns (base, adapters) instead."""
  saved = run_config(run_dir)
  needed = [n for n in spec.names if not is_adapter(n) and not n.startswith(FROZEN_COPIES)]
  mesh = next(iter(shardings.values())).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def plan(meta):
    targets = {}
    for n in meta:
      if n not in needed and not is_adapter(n):
        continue
      if n in needed and tuple(meta[n].shape) != tuple(spec.shapes[n].shape):
        raise CheckpointError(f'{run_dir}: parameter {n!r} has shape {tuple(meta[n].shape)}, '
                              f'expected {tuple(spec.shapes[n].shape)}')
      sharding = shardings[n] if n in needed else replicated
      dtype = spec.shapes[n].dtype if n in needed else meta[n].dtype
      targets[n] = (jax.ShapeDtypeStruct(tuple(meta[n].shape), dtype, sharding=sharding),
                    ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype))
    return targets

  params, _ = read_params(run_dir, plan)
  missing = [n for n in needed if n not in params]
  if missing:  # a partial run: its frozen weights come from where that run got them
    base = _rebuild_missing(run_dir, saved, missing, spec, shardings)
    params.update({n: base[n] for n in missing})
  adapters = {n: v for n, v in params.items() if is_adapter(n)}
  if not merge:
    return {n: params[n] for n in needed}, adapters
  if adapters:  # a LoRA run: fold its adapters in, with its own lora settings
    params = lora.merge(params, ml_collections.ConfigDict(saved['model']['lora']))
  return {n: params[n] for n in needed}


def load_params(source: str, spec: ModelSpec, shardings: dict) -> dict:
  """{name: array} of the base weights `spec` needs, from an lm run, a HF directory or a GGUF file."""
  source_kind = kind(source)
  if source_kind == 'hf':
    return hf.load_params(source, ModelSpec(lora.without_adapters(spec.cfg)), shardings)
  if source_kind == 'gguf':
    return gguf_io.load_params(gguf_io.find_file(source), ModelSpec(lora.without_adapters(spec.cfg)),
                               shardings)
  return base_params(source, spec, shardings)
