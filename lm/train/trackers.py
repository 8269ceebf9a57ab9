"""Experiment trackers beside metrics.jsonl: TensorBoard event files, Weights & Biases, Trackio.

`train.trackers` names them ('tensorboard,wandb'); each gets the resolved config when the run
starts, every logged step's metrics and evaluation results, and the final summary. The libraries do
the work; this module only adapts one call each.

  tensorboard  tensorboardX event files in WORKDIR/tensorboard (metrics.tensorboard=False drops it)
  wandb        a W&B run in WORKDIR/wandb; WANDB_MODE=offline writes a folder `wandb sync` uploads
  trackio      a Trackio run in its local database (TRACKIO_DIR, default ~/.cache/huggingface/trackio)

A resumed run continues the same tracker run: the W&B run id and the Trackio run name are kept in
WORKDIR/trackers.json. A tracker that fails to start stops the run before any step (one line, exit
2) unless train.tracker_errors='warn', which trains without it; one that fails later is dropped
with a warning (metrics.jsonl still has everything).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import sys

from lm.errors import ConfigError, UserError
from lm.train import rundir

NAMES = ('tensorboard', 'wandb', 'trackio')
PACKAGES = {'tensorboard': 'tensorboardX', 'wandb': 'wandb', 'trackio': 'trackio'}
ERROR_POLICIES = ('fail', 'warn')
STATE_FILE = 'trackers.json'


def names(cfg) -> list[str]:
  """The configured trackers, in order; ConfigError for an unknown or missing one. Before
  training starts, so a typo or an uninstalled package costs nothing."""
  out = []
  for name in (n.strip().lower() for n in cfg.train.trackers.split(',')):
    if not name or name in out:
      continue
    if name not in NAMES:
      raise ConfigError(f'train.trackers: unknown tracker {name!r}; choose from {", ".join(NAMES)}')
    if importlib.util.find_spec(PACKAGES[name]) is None:
      raise ConfigError(f'train.trackers: {name} needs the {PACKAGES[name]} package, which is not '
                        f'installed; pip install {PACKAGES[name]} (or "lm[trackers]"), or drop '
                        f'{name} from train.trackers')
    out.append(name)
  if not cfg.metrics.tensorboard and 'tensorboard' in out:
    out.remove('tensorboard')  # the older switch, kept so configs that set it mean what they did
  return out


def _warn(message: str) -> None:
  print(f'lm: warning: {message}', file=sys.stderr, flush=True)


class _TensorBoard:

  def __init__(self, workdir, config, run):
    del run
    self.writer = _summary_writer(rundir.inside(workdir, 'tensorboard'))
    self.writer.add_text('config', '```\n' + json.dumps(config, indent=2) + '\n```', 0)

  def log(self, step, scalars):
    for k, v in scalars.items():
      self.writer.add_scalar(k, v, step)

  def flush(self):
    self.writer.flush()

  def finish(self, summary, failed):
    del failed
    if summary:
      self.writer.add_text('summary', '```\n' + json.dumps(summary, indent=2) + '\n```',
                           int(summary.get('step', 0)))
    self.writer.close()


class _WandB:

  def __init__(self, workdir, config, run):
    import wandb  # pylint: disable=import-outside-toplevel
    # resume='allow': the id of the run this workdir started continues it, else a new run.
    # mode and the API key are read now, not from wandb's process-wide settings: those are
    # frozen at the first wandb.init of the process, and a second run in the same process
    # (a sweep, a notebook) may set WANDB_MODE differently.
    self.run = wandb.init(project=run['project'], name=run['name'], id=run['id'], resume='allow',
                          dir=workdir, config=config, mode=os.environ.get('WANDB_MODE') or None,
                          settings=wandb.Settings(api_key=os.environ.get('WANDB_API_KEY') or None))

  def log(self, step, scalars):
    self.run.log(scalars, step=step)

  def flush(self):
    pass

  def finish(self, summary, failed):
    if summary:
      self.run.summary.update(summary)
    self.run.finish(exit_code=1 if failed else 0)


class _Trackio:

  def __init__(self, workdir, config, run):
    del workdir
    import trackio  # pylint: disable=import-outside-toplevel
    self.trackio = trackio
    self.run = trackio.init(project=run['project'], name=run['name'], config=config, resume='allow')

  def log(self, step, scalars):
    self.run.log(scalars, step=step)

  def flush(self):
    pass

  def finish(self, summary, failed):
    del failed
    if summary:  # Trackio has no summary of its own: the final figures, as the last step's
      step = int(summary.get('step', 0))
      self.run.log({f'summary/{k}': v for k, v in summary.items() if _scalar(v)}, step=step)
    self.run.finish()


KINDS = {'tensorboard': _TensorBoard, 'wandb': _WandB, 'trackio': _Trackio}


def _scalar(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _run_record(workdir: str, project: str) -> dict:
  """The tracker run this workdir logs to: read back when resuming, else made and kept."""
  path = rundir.inside(workdir, STATE_FILE)
  if os.path.isfile(path):
    with open(path, encoding='utf-8') as f:
      record = json.load(f)
    if record.get('project') == project:
      return record
  name = os.path.basename(os.path.normpath(workdir)) or 'run'
  record = {'project': project, 'name': name, 'id': f'{name[:40]}-{secrets.token_hex(4)}'}
  rundir.write_text(path, json.dumps(record, indent=2))
  return record


class Trackers:
  """The started trackers; each call goes to all of them."""

  def __init__(self, workdir: str, cfg, selected: list[str]):
    self.errors = cfg.train.tracker_errors
    self.active = {}
    if not selected:
      return
    config = json.loads(cfg.to_json_best_effort())
    run = _run_record(workdir, cfg.train.tracker_project)
    for name in selected:
      try:
        self.active[name] = KINDS[name](workdir, config, run)
      except Exception as e:  # pylint: disable=broad-except  # each library fails in its own way
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        message = f'train.trackers: {name} failed to start ({type(e).__name__}: {first})'
        if self.errors == 'fail':
          self.finish({}, failed=True)
          raise UserError(f'{message}; fix it, or set train.tracker_errors=warn to train '
                          'without it') from None
        _warn(f'{message}; training without it (train.tracker_errors=warn)')

  def _each(self, method: str, *args) -> None:
    for name, tracker in list(self.active.items()):
      try:
        getattr(tracker, method)(*args)
      except Exception as e:  # pylint: disable=broad-except
        del self.active[name]
        _warn(f'train.trackers: {name} failed ({type(e).__name__}: {str(e)[:200]}); continuing '
              'without it, metrics.jsonl has every step')

  def log(self, step: int, scalars: dict) -> None:
    self._each('log', step, scalars)

  def flush(self) -> None:
    self._each('flush')

  def finish(self, summary: dict, failed: bool) -> None:
    self._each('finish', summary, failed)
    self.active = {}


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed (seconds of start-up) only to accept torch tensors, and lm writes Python floats."""
  hide_torch = 'torch' not in sys.modules
  if hide_torch:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hide_torch:
      del sys.modules['torch']  # a later `import torch` (the HF comparisons) works as usual
  return SummaryWriter(logdir)
