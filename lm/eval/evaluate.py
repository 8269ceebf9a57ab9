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
import re
import time

import jax
import ml_collections

from lm import config as config_lib
from lm import sharding as sharding_lib
from lm.eval import tasks as tasks_lib
from lm.data import tokenizer as tokenizer_lib
from lm.data.tokenizer import Tokenizer
from lm.errors import UserError
from lm.eval.generate import Generator
from lm.eval.scoring import Scorer
from lm.io import output, pretrained, runs
from lm.train.state import ModelSpec


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
  if runs.is_hf_directory(run_dir):
    return _load_hf_model(name, run_dir, step, mesh)
  cfg = runs.load_config(run_dir)
  tokenizer = runs.run_tokenizer(run_dir, cfg)  # before the weights: the cheaper error first
  model_spec, mesh, shardings = _placement(cfg, mesh)
  params, step = runs.restore_params(run_dir, cfg, model_spec, shardings, step)
  return Model(name, cfg, model_spec, params, tokenizer, mesh, run_dir, step)


def _placement(cfg, mesh):
  """(model spec, mesh, parameter shardings) for `cfg` on `mesh` (default: the config's mesh)."""
  model_spec = ModelSpec(cfg.model)
  mesh = mesh or sharding_lib.make_mesh(cfg.mesh)
  shardings = sharding_lib.param_shardings(model_spec.logical_axes, model_spec.shapes, mesh,
                                           tuple(cfg.mesh.rules))
  return model_spec, mesh, shardings


def _load_hf_model(name: str, path: str, step: int | None, mesh) -> Model:
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


def run_tasks(model: Model, tasks: list, settings: tasks_lib.Settings, *, log=print,
              progress: bool = False) -> dict:
  """{task name: metrics}, each with its wall time. `tasks`: built-in names, task file paths or
  parsed tasks (tasks_lib.parse_tasks)."""
  out = {}
  for task in [tasks_lib.resolve(t) for t in tasks]:
    start = time.perf_counter()
    out[task.name] = tasks_lib.run(task, model, settings, progress=progress)
    out[task.name]['seconds'] = time.perf_counter() - start
    headline = out[task.name]['headline']
    value = out[task.name].get(headline)  # absent where undefined (a reward without a reference)
    # A limit that leaves records out is said, not silent: the figure covers part of the file.
    part = (f'; {out[task.name]["n"]} of {out[task.name]["available"]} records (limit '
            f'{tasks_lib.limit_of(task, settings)}; --config.limit=0 for all)'
            if 'available' in out[task.name] else '')
    log(f'  {model.name} {task.name}: {headline} '
        f'{"-" if value is None else format(value, ".4g")} ({out[task.name]["seconds"]:.0f} s{part})')
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
    columns = [(t, next(results[m][t]['headline'] for m in models if t in results[m]))
               for t in tasks]
  header = '| model | ' + ' | '.join(f'{t} {m}' for t, m in columns) + ' |'
  lines = [header, '|' + '---|' * (len(columns) + 1)]
  for m in models:
    cells = [_fmt(results[m].get(t, {}).get(k, '')) for t, k in columns]
    lines.append(f'| {m} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


OUTPUTS = ('results.json', 'results.md', 'items')  # what `lm eval` writes (before the output marker)


def check_output(out_dir: str, run_specs) -> None:
  """UserError unless `lm eval` may write `out_dir` (lm/io/output.py: not on or in a run it
  reads, nor over a folder of other files); before any model loads."""
  output.check(out_dir, '--out', [parse_run(s)[1] for s in run_specs], kind='evaluation',
               folder=True, any_source=True, legacy=OUTPUTS)


def split_items(results: dict) -> tuple[dict, dict]:
  """({model: {task: metrics}} without the per-item lists, {(model, task): items})."""
  items, lean = {}, {}
  for model, per_task in results.items():
    lean[model] = {}
    for task, metrics in per_task.items():
      lean[model][task] = {k: v for k, v in metrics.items() if k != 'items'}
      if 'items' in metrics:
        items[model, task] = metrics['items']
  return lean, items


def _file_name(name: str) -> str:
  return re.sub(r'[^\w.-]', '_', name) or '_'


def write_results(out_dir: str, results: dict, meta: dict, table: str, run_specs=()) -> None:
  """results.json and results.md, and every item's own figures (items/MODEL/TASK.jsonl: the
  output and its answer, each choice's log-probability, each document's or pair's log-prob),
  written whole into place (an earlier evaluation's are replaced)."""
  results, items = split_items(results)
  with output.directory(out_dir, '--out', [parse_run(s)[1] for s in run_specs],
                        kind='evaluation', any_source=True, legacy=OUTPUTS) as partial:
    with open(os.path.join(partial, 'results.json'), 'w', encoding='utf-8') as f:
      json.dump({'meta': meta, 'results': results}, f, indent=2)
    with open(os.path.join(partial, 'results.md'), 'w', encoding='utf-8') as f:
      f.write(table)
    write_items(partial, items)


def write_items(out_dir: str, items: dict) -> None:
  """{(model, task): [item, ...]} as out_dir/items/MODEL/TASK.jsonl."""
  for (model, task), rows in items.items():
    folder = os.path.join(out_dir, 'items', _file_name(model))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f'{_file_name(task)}.jsonl'), 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(row) + '\n' for row in rows)


def evaluate_runs(run_specs: list[str], tasks: list, settings: tasks_lib.Settings,
                  out_dir: str, *, log=print, progress: bool = False) -> dict:
  """`lm eval`: every task on every run; writes out_dir/results.json and results.md only once
  all of them have run."""
  tasks = [tasks_lib.resolve(t) for t in tasks]
  check_output(out_dir, run_specs)
  results = {}
  for spec in run_specs:
    model = load_model(spec)
    log(f'{model.name}: {model.run_dir} step {model.step}')
    results[model.name] = run_tasks(model, tasks, settings, log=log, progress=progress)
  table = markdown_table(results)
  write_results(out_dir, results, {'runs': run_specs, 'tasks': [t.path for t in tasks],
                                   'settings': dataclasses.asdict(settings)}, table, run_specs)
  return results


# --- during training ----------------------------------------------------------------------------

def training_evaluator(cfg, spec: ModelSpec, tokenizer, mesh):
  """fn(params) -> {'task/metric': value} for `train.eval_tasks`, or None when none are set."""
  tasks = tasks_lib.parse_tasks(cfg.train.eval_tasks) if cfg.train.eval_tasks else []
  if not tasks:
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
    for task in tasks:
      metrics = tasks_lib.run(task, model, settings)
      out.update({f'{task.name}/{k}': v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and k not in ('n', 'stride')})
    return out

  return evaluate


class EarlyStopping:
  """Stops when `metric` has not improved by `min_delta` for `patience` evaluations.

  Lower is better for losses and perplexities, higher for everything else.
  """

  def __init__(self, metric: str, patience: int, min_delta: float = 0.0):
    self.metric, self.patience, self.min_delta = metric, patience, min_delta
    self.lower_is_better = tasks_lib.lower_is_better(metric)
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
