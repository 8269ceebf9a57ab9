"""Orbax checkpoints in `<workdir>/checkpoints`: the train state, the data iterator position and a
small JSON record of what was saved.

- What is saved: step, trainable parameters, optimizer state, the numerical guard's state, the
  data position, and `meta` (the run's seeds and, for partial runs, the reference to the base
  model). Frozen parameters are not saved: a LoRA or other partial run stores only what it trains,
  and the frozen rest is rebuilt from the base that `meta` names.
- Whole or absent: Orbax writes each step into a temporary directory and renames it when complete;
  leftover temporary directories from a killed save are removed on start.
- Corruption: a checkpoint that cannot be read is moved to `<workdir>/checkpoints-unreadable/` with
  a warning, and restore falls back to the next older one.
- Any mesh: restoring places every array directly into the target sharding, so a run saved on 8
  devices restores on 1 or 4.
- Which are kept: the latest `keep`, plus every step that is a multiple of `keep_every`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from lm.train import rundir
from lm.errors import CheckpointError
from lm.train.partition import NOT_TRAINED, TRAINABLE
from lm.train.state import TrainState, abstract_with_shardings

FORMAT = 1
UNREADABLE = 'checkpoints-unreadable'


class Unreadable(Exception):
  """This step's files are damaged; an older step may still be good."""


def first_readable(steps, read, on_unreadable, directory: str):
  """read(step) for the first of `steps` (newest first) that reads. A step whose read raises
  Unreadable is passed to on_unreadable(step, reason) (which may raise) and the next is tried:
  the one fallback every reader of checkpoints shares (resume, generate, eval, export, init_from)."""
  failed = []
  for step in steps:
    try:
      return read(step)
    except Unreadable as e:
      on_unreadable(step, str(e))
      failed.append(step)
  raise CheckpointError(f'no readable checkpoint in {directory} (steps {failed} are unreadable); '
                        'train the run again or restore its checkpoints from a copy')


@contextlib.contextmanager
def quiet_orbax():
  """Orbax's absl warnings about what it chose not to do (a read-only manager, metadata files of
  older layouts) are not lm's user's concern; failures still raise."""
  logger = logging.getLogger('absl')
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    yield
  finally:
    logger.setLevel(level)


def warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f'lm: warning: {message}', file=sys.stderr, flush=True)


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True,
               labels: dict | None = None, meta: dict | None = None, read_only: bool = False):
    """`labels` ({name: trainable|frozen}) selects the parameters to save; `meta` is a JSON record
    saved with every step (seeds, base reference) and compared on restore. `read_only` reads
    another run's checkpoints without touching them."""
    self.workdir = os.path.abspath(workdir)
    self.directory = rundir.inside(self.workdir, 'checkpoints')
    self.labels = labels
    self.meta = dict(meta or {})
    keep_policies = [policies.LatestN(keep)]
    if keep_every:
      keep_policies.append(policies.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        create=not read_only, read_only=read_only, enable_async_checkpointing=async_save,
        cleanup_tmp_directories=not read_only,
        preservation_policy=policies.AnyPreservationPolicy(keep_policies))
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _saved(self, name: str) -> bool:
    """Whether a partial checkpoint holds parameter `name`: the trained ones and those the step
    moves outside the gradient (the MoE correction bias), which no base weights hold."""
    return self.labels[name] == TRAINABLE or name in NOT_TRAINED

  def _partial(self) -> bool:
    return self.labels is not None and not all(self._saved(k) for k in self.labels)

  def _saved_part(self, state: TrainState) -> TrainState:
    if not self._partial():
      return state
    return state.replace(params={k: v for k, v in state.params.items() if self._saved(k)})

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> None:
    """Starts writing `step`; with async saving, returns once the arrays are copied off device."""
    meta = {'format': FORMAT, 'step': int(step), 'params': 'trainable' if self._partial() else 'all',
            **self.meta}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(self._saved_part(state)), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state: TrainState, shardings: TrainState, step: int | None = None, *,
              base_params: dict | None = None):
    """(state, data_state) of `step` (default: the latest readable one), placed with `shardings`.

    A partial checkpoint takes its frozen parameters from `base_params`. Without `step`, an
    unreadable checkpoint is set aside with a warning and the next older one is tried.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    set_aside = []

    def unreadable(s, reason):
      if step is not None:
        raise CheckpointError(f'checkpoint step {s} in {self.directory} is unreadable ({reason}); '
                              'restore another step') from None
      moved = self._set_aside(s)
      set_aside.append(s)
      warn(f'checkpoint step {s} is unreadable ({reason}); moved it to {moved} and falling back to '
           'the previous checkpoint')

    try:
      return first_readable(steps, lambda s: self._restore(s, abstract_state, shardings, base_params),
                            unreadable, self.directory)
    except CheckpointError as e:
      if not set_aside or 'no readable checkpoint' not in str(e):
        raise
    raise CheckpointError(f'no readable checkpoint in {self.directory} (steps {set_aside} were '
                          f'unreadable and moved to {os.path.join(self.workdir, UNREADABLE)}); '
                          'start a new run with another --workdir')

  def _restore(self, step, abstract_state, shardings, base_params):
    meta = self.read_meta(step)
    target = abstract_with_shardings(abstract_state, shardings)
    partial = meta.get('params') == 'trainable'
    if partial:
      if self.labels is None or base_params is None:
        raise CheckpointError(f'checkpoint step {step} holds only the trained parameters of a '
                              'partial run; restore it with the run\'s config (train.trainable, '
                              'train.init_from)')
      target = target.replace(params={k: v for k, v in target.params.items() if self._saved(k)})
      self._check_base(meta, step)
    self._check_fits(step, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise Unreadable(first_line(e)) from None
    state = restored.state
    if partial:
      state = state.replace(params={**{k: v for k, v in base_params.items()
                                       if not self._saved(k)}, **state.params})
    return state, restored.data

  def read_meta(self, step: int) -> dict:
    """The JSON record saved with `step`: what it holds (`params: all | trainable`), its base."""
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except
      raise Unreadable(f'its record cannot be read: {first_line(e)}') from None
    if not isinstance(meta, dict) or meta.get('format') != FORMAT:
      raise Unreadable('its record is missing or malformed')
    return meta

  def _check_base(self, meta: dict, step: int) -> None:
    for key in ('init_from', 'seed'):
      if key in self.meta.get('base', {}) and meta.get('base', {}).get(key) != self.meta['base'][key]:
        raise CheckpointError(
            f'checkpoint step {step} was trained on base {key}={meta.get("base", {}).get(key)!r} '
            f'but this run has {self.meta["base"][key]!r}; resume with the base it was trained on')

  def _check_fits(self, step: int, target: TrainState) -> None:
    """Raises CheckpointError (no fallback: an older step would not fit either) when the saved
    tree or shapes differ from the model and optimizer this run builds."""
    try:
      saved = self.manager.item_metadata(step).state
      saved = saved.tree if hasattr(saved, 'tree') else saved
      saved_flat = dict(_flat_shapes(saved))
    except Exception as e:  # pylint: disable=broad-except
      raise Unreadable(f'its array metadata cannot be read: {first_line(e)}') from None
    wanted = dict(_flat_shapes(target))
    missing = sorted(set(wanted) - set(saved_flat))
    extra = sorted(set(saved_flat) - set(wanted))
    params_first = lambda k: (not k.startswith('params.'), k)  # pylint: disable=unnecessary-lambda-assignment
    missing, extra = sorted(missing, key=params_first), sorted(extra, key=params_first)
    wrong = sorted((k for k in set(wanted) & set(saved_flat) if wanted[k] != saved_flat[k]),
                   key=params_first)
    if missing or extra or wrong:
      if wrong:
        what = f'{wrong[0]} is {saved_flat[wrong[0]]} there but {wanted[wrong[0]]} here'
      elif missing:
        what = f'it lacks {missing[0]}' + (f' and {len(missing) - 1} more' if len(missing) > 1 else '')
      else:
        what = f'it has {extra[0]}, which this run does not'
      if 'lora_' in (wrong or missing or extra)[0]:
        what += '; model.lora (rank, targets) differs from the run that wrote it'
      raise CheckpointError(f'checkpoint step {step} in {self.directory} does not fit this model '
                            f'and optimizer ({what}); use a new --workdir or the config it was '
                            'trained with')

  def _set_aside(self, step: int) -> str:
    src = rundir.inside(self.directory, str(step))
    dst_dir = rundir.inside(self.workdir, UNREADABLE)
    stamp = time.strftime('%Y%m%d-%H%M%S')
    dst, n = os.path.join(dst_dir, f'{step}-{stamp}'), 0
    while os.path.exists(dst):
      n += 1
      dst = os.path.join(dst_dir, f'{step}-{stamp}-{n}')
    if jax.process_index() == 0:
      os.makedirs(dst_dir, exist_ok=True)
      os.replace(src, dst)
    multihost_utils.sync_global_devices(f'lm-checkpoint-set-aside-{step}')
    self.manager.reload()
    return dst

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _flat_shapes(tree):
  """(path, shape) of every array leaf; paths as dotted strings."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in leaves:
    shape = getattr(leaf, 'shape', None)
    if shape is None:
      continue
    yield '.'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path), tuple(shape)


def first_line(e: Exception) -> str:
  text = (str(e).strip().splitlines() or [''])[0].split('. See full TensorStore details')[0]
  return f'{type(e).__name__}: {text[:200]}'
