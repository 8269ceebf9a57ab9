"""`lm eval`: load models from run directories, run a set of tasks, write JSON and a markdown table;
and the pieces the training loop uses to evaluate tasks every K steps and stop early.

A model is named by its run directory (`runs/x`, latest checkpoint), optionally a step
(`runs/x@300`) and a label (`base=runs/x`). Only the parameters are restored (not the optimizer
state), straight into their shardings on this process's mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time

import jax
import ml_collections
import orbax.checkpoint as ocp

from lm import sharding as sharding_lib
from lm.eval import tasks as tasks_lib
from lm.data import tokenizer as tokenizer_lib
from lm.data.tokenizer import Tokenizer
from lm.errors import CheckpointError, ConfigError, UserError
from lm.eval.generate import Generator
from lm.eval.scoring import Scorer
from lm.io.runs import load_config
from lm.train.state import ModelSpec


def run_tokenizer(run_dir: str, cfg):
  """The run's own trained tokenizer, else the one it was configured with (a SentencePiece model,
  a tokenizer.json or a Hugging Face folder holding one)."""
  own = os.path.join(run_dir, 'tokenizer.model')
  return Tokenizer(own) if os.path.isfile(own) else tokenizer_lib.load(cfg.data.tokenizer)


def restore_params(run_dir: str, cfg, spec: ModelSpec, shardings: dict, step: int | None = None):
  """(params, step): the parameters of a checkpoint, without its optimizer state.

  A partial run (LoRA and other frozen partitions) saves only what it trains; its frozen weights
  come from its `train.init_from`, as they did in training.
  """
  directory = os.path.join(os.path.abspath(run_dir), 'checkpoints')
  # Read-only: no directory creation or cleanup in a run that may still be writing.
  manager = ocp.CheckpointManager(directory, item_handlers={
      'state': ocp.PyTreeCheckpointHandler(), 'data': ocp.JsonCheckpointHandler(),
      'meta': ocp.JsonCheckpointHandler()})
  step = manager.latest_step() if step is None else step
  if step is None or step not in manager.all_steps():
    raise CheckpointError(f'no checkpoint {"" if step is None else step} in {directory}; '
                          f'have {sorted(manager.all_steps())}')
  saved = manager.item_metadata(step).state
  saved = getattr(saved, 'tree', saved)['params']
  target = {'params': {k: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[k])
                       for k, s in spec.shapes.items() if k in saved}}
  args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(target))
  params = manager.restore(step, args=ocp.args.Composite(state=args)).state['params']
  manager.close()
  missing = [k for k in spec.names if k not in params]
  if missing:
    if not cfg.train.get('init_from'):
      raise CheckpointError(f'checkpoint step {step} in {directory} lacks {missing[0]!r} (and '
                            f'{len(missing) - 1} more) and the run names no train.init_from')
    from lm.io import pretrained  # pylint: disable=import-outside-toplevel
    base = pretrained.load_params(cfg.train.init_from, spec, shardings)
    params = {**{k: base[k] for k in missing}, **params}
  return params, step


@dataclasses.dataclass
class Model:
  """A model ready to evaluate: parameters placed on the mesh, tokenizer, generator, scorer."""
  name: str
  cfg: ml_collections.ConfigDict
  spec: ModelSpec
  params: dict
  tokenizer: Tokenizer  # or tokenizer_lib.HFTokenizer: the same interface
  mesh: jax.sharding.Mesh
  run_dir: str = ''
  step: int = 0

  @functools.cached_property
  def generator(self):
    return Generator(self.cfg, self.params, self.tokenizer, mesh=self.mesh, spec=self.spec)

  @functools.cached_property
  def scorer(self):
    return Scorer(self.cfg, self.params, mesh=self.mesh, spec=self.spec)


def parse_run(spec: str) -> tuple[str, str, int | None]:
  """'[NAME=]DIR[@STEP]' -> (name, dir, step)."""
  name, _, rest = spec.rpartition('=')
  run_dir, _, step = rest.partition('@')
  if step and not step.isdigit():
    raise UserError(f'{spec!r}: the step after @ must be a number')
  return name or os.path.basename(os.path.normpath(run_dir)), run_dir, int(step) if step else None


def load_model(spec: str, *, mesh=None) -> Model:
  """A model ready to generate and evaluate from `[NAME=]DIR[@STEP]`: an lm run directory (its
  latest checkpoint, or STEP), a Hugging Face model directory (config.json, *.safetensors and a
  tokenizer.json or tokenizer.model) or a llama.cpp GGUF file (or a directory holding one)."""
  name, run_dir, step = parse_run(spec)
  if _is_hf_directory(run_dir):
    return _load_hf_model(name, run_dir, step, mesh)
  cfg = load_config(run_dir)
  model_spec, mesh, shardings = _placement(cfg, mesh)
  params, step = restore_params(run_dir, cfg, model_spec, shardings, step)
  return Model(name, cfg, model_spec, params, run_tokenizer(run_dir, cfg), mesh, run_dir, step)


def _placement(cfg, mesh):
  """(model spec, mesh, parameter shardings) for `cfg` on `mesh` (default: the config's mesh)."""
  model_spec = ModelSpec(cfg.model)
  mesh = mesh or sharding_lib.make_mesh(cfg.mesh)
  shardings = sharding_lib.param_shardings(model_spec.logical_axes, model_spec.shapes, mesh,
                                           tuple(cfg.mesh.rules))
  return model_spec, mesh, shardings


def _is_hf_directory(path: str) -> bool:
  from lm.io import pretrained  # pylint: disable=import-outside-toplevel
  try:
    return pretrained.kind(path) in ('hf', 'gguf')
  except ConfigError:  # neither kind: load_config below says what a run directory needs
    return False


def _load_hf_model(name: str, path: str, step: int | None, mesh) -> Model:
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  from lm.io import pretrained  # pylint: disable=import-outside-toplevel
  if step is not None:
    raise UserError(f'{path}@{step}: a Hugging Face directory or GGUF file has one set of weights; '
                    f'drop @{step}')
  cfg = config_lib.base_config()
  cfg.train.init_from = path
  pretrained.resolve_config(cfg)  # the architecture, and the tokenizer if the folder has one
  if not cfg.data.tokenizer:
    raise UserError(f'{path} has no tokenizer.json or tokenizer.model; copy the model\'s '
                    'tokenizer into it')
  model_spec, mesh, shardings = _placement(cfg, mesh)
  params = pretrained.load_params(path, model_spec, shardings)
  return Model(name, cfg, model_spec, params, tokenizer_lib.load(cfg.data.tokenizer), mesh, path, 0)


def run_tasks(model: Model, names: list[str], settings: tasks_lib.Settings, *,
              log=print) -> dict:
  """{task: metrics}, each with its wall time."""
  out = {}
  for name in names:
    start = time.perf_counter()
    out[name] = tasks_lib.TASKS[name](model, settings)
    out[name]['seconds'] = time.perf_counter() - start
    headline, _ = tasks_lib.HEADLINE[name]
    log(f'  {model.name} {name}: {headline} {out[name][headline]:.4g} '
        f'({out[name]["seconds"]:.0f} s)')
  return out


def _fmt(value) -> str:
  if isinstance(value, float):
    return f'{value:.3g}' if abs(value) >= 1000 or abs(value) < 0.01 else f'{value:.2f}'
  return str(value)


def markdown_table(results: dict, columns: list[tuple[str, str]] | None = None) -> str:
  """results: {model: {task: {metric: value}}} -> one row per model, one column per task metric
  (default: each task's headline metric)."""
  models = list(results)
  if columns is None:
    tasks = list(dict.fromkeys(t for m in models for t in results[m]))
    columns = [(t, tasks_lib.HEADLINE[t][0]) for t in tasks]
  header = '| model | ' + ' | '.join(f'{t} {m}' for t, m in columns) + ' |'
  lines = [header, '|' + '---|' * (len(columns) + 1)]
  for m in models:
    cells = [_fmt(results[m].get(t, {}).get(k, '')) for t, k in columns]
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def write_results(out_dir: str, results: dict, meta: dict, table: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
    json.dump({'meta': meta, 'results': results}, f, indent=2)
  with open(os.path.join(out_dir, 'results.md'), 'w', encoding='utf-8') as f:
    f.write(table)


def evaluate_runs(run_specs: list[str], task_names: list[str], settings: tasks_lib.Settings,
                  out_dir: str, *, log=print) -> dict:
  """`lm eval`: every task on every run; writes out_dir/results.json and results.md."""
  results = {}
  for spec in run_specs:
    model = load_model(spec)
    log(f'{model.name}: {model.run_dir} step {model.step}')
    results[model.name] = run_tasks(model, task_names, settings, log=log)
  table = markdown_table(results)
  write_results(out_dir, results, {'runs': run_specs, 'tasks': task_names,
                                   'settings': dataclasses.asdict(settings)}, table)
  return results


# --- during training ----------------------------------------------------------------------------

def training_evaluator(cfg, spec: ModelSpec, tokenizer, mesh):
  """fn(params) -> {'task/metric': value} for `train.eval_tasks`, or None when none are set."""
  names = tasks_lib.parse_tasks(cfg.train.eval_tasks) if cfg.train.eval_tasks else []
  if not names:
    return None
  settings = tasks_lib.Settings(limit=cfg.train.eval_task_limit, batch_size=cfg.data.batch_size)
  model = Model('train', cfg, spec, None, tokenizer, mesh)

  def evaluate(params):
    # One Model for the whole run, so generation and scoring compile once; the training state's
    # parameters already have the shardings they expect.
    model.params = params
    for placed in (model.__dict__.get('generator'), model.__dict__.get('scorer')):
      if placed is not None:
        placed.params = params
    out = {}
    for name in names:
      metrics = tasks_lib.TASKS[name](model, settings)
      out.update({f'{name}/{k}': v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and k != 'n'})
    return out

  return evaluate


class EarlyStopping:
  """Stops when `metric` has not improved by `min_delta` for `patience` evaluations.

  Lower is better for losses and perplexities, higher for everything else.
  """

  def __init__(self, metric: str, patience: int, min_delta: float = 0.0):
    self.metric, self.patience, self.min_delta = metric, patience, min_delta
    self.lower_is_better = any(s in metric for s in ('loss', 'perplexity', 'nll'))
    self.best, self.best_step, self.bad = math.inf, None, 0

  def update(self, step: int, metrics: dict) -> bool:
    """True when training should stop."""
    if self.metric not in metrics:
      raise UserError(f'train.early_stopping_metric={self.metric!r} is not among the evaluation '
                      f'metrics {sorted(metrics)}')
    value = metrics[self.metric] if self.lower_is_better else -metrics[self.metric]
    if value < self.best - self.min_delta:
      self.best, self.best_step, self.bad = value, step, 0
      return False
    self.bad += 1
    return self.bad >= self.patience

  def summary(self) -> dict:
    best = self.best if self.lower_is_better else -self.best
    return {'early_stopping_best': best, 'early_stopping_best_step': self.best_step}
