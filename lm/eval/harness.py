"""lm-eval-harness on lm runs: an `lm_eval.api.model.LM` registered as model `lm`.

  lm eval RUN --harness hellaswag,arc_easy --out DIR        harness tasks beside lm's own
  lm eval RUN --harness path/to/task.yaml --out DIR         a harness task YAML (offline with
                                                            dataset_path: json and local files)
  python -m lm.eval.harness --model lm --model_args run=RUN --tasks hellaswag --batch_size 32
                                                            the harness's own CLI, `lm` registered

lm-eval 0.4.13 finds models in its own registry only (it reads no entry points), so `lm_eval
--model lm` works in a process that has imported this module; `python -m lm.eval.harness` is the
harness CLI with that import done.

Requests go through the same sharded scorer and KV-cache generator as `lm eval`'s own tasks:
loglikelihood and loglikelihood_rolling are batched (context, continuation) scoring, rolling windows
follow the harness's own `get_rolling_token_windows`, generate_until groups requests by their
generation settings and decodes each group in batches.
"""

from __future__ import annotations

import json
import os

from lm.errors import UserError

try:
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError:  # the optional extra: pip install 'lm[eval]'
  LM, register_model = object, None


def _require():
  if register_model is None:
    raise UserError('lm-eval-harness is not installed; pip install "lm[eval]" (lm-eval==0.4.13)')


class LMHarnessModel(LM):
  """An lm model (run directory or Hugging Face directory) as a harness model.

  model_args: run=[NAME=]DIR[@STEP], seed=0, progress=true; the harness's --batch_size (default
  16 here when it passes none).
  """

  def __init__(self, run: str | None = None, model=None, batch_size: int | str = 16,
               seed: int = 0, progress: bool | str = True, **unused):
    _require()
    super().__init__()
    del unused  # the harness passes device, max_batch_size, ...: lm places the model itself
    if model is None:
      if not run:
        raise UserError('model_args needs run=RUN_DIR (an lm run or a Hugging Face directory)')
      from lm.eval import evaluate  # pylint: disable=import-outside-toplevel
      model = evaluate.load_model(run)
    self.model = model
    # The harness passes --batch_size (an int, or 'auto' which lm does not search for).
    self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
    self.seed = int(seed)
    self.progress = str(progress).lower() not in ('false', '0', 'no')

  def _label(self, what: str) -> str:
    return f'{self.model.name} {what}' if self.progress else ''

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.model.tokenizer, 'path', self.model.name).replace('/', '__')

  @property
  def _prefix(self) -> list[int]:
    tok = self.model.tokenizer
    return [tok.bos_id if tok.bos_id is not None else tok.eos_id]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    from lm.eval.tasks import _split_encode  # pylint: disable=import-outside-toplevel
    pairs = []
    for context, continuation in (r.args for r in requests):
      if context:
        ctx, cont = _split_encode(self.model.tokenizer, context, continuation)
      else:  # the harness's convention: an empty context is the BOS/EOS token
        ctx, cont = self._prefix, self.model.tokenizer.encode(continuation)
      pairs.append((ctx if ctx else self._prefix, cont))
    scores = self.model.scorer.score(pairs, batch_size=self.batch_size,
                                     progress=self._label('loglikelihood'))
    return [(logp, greedy) for logp, _, greedy in scores]

  def loglikelihood_rolling(self, requests) -> list[float]:
    from lm_eval import utils  # pylint: disable=import-outside-toplevel
    max_len = self.model.cfg.model.max_seq_len
    windows, owner = [], []
    for i, (text,) in enumerate(r.args for r in requests):
      ids = self.model.tokenizer.encode(text)
      for window in utils.get_rolling_token_windows(ids, self._prefix[0], max_len, 1):
        context, continuation = utils.make_disjoint_window(window)
        windows.append((context, continuation))
        owner.append(i)
    scores = self.model.scorer.score(windows, batch_size=self.batch_size,
                                     progress=self._label('loglikelihood_rolling'))
    totals = [0.0] * len(requests)
    for i, (logp, _, _) in zip(owner, scores):
      totals[i] += logp
    return totals

  def generate_until(self, requests) -> list[str]:
    from lm.eval.generate import Sampling  # pylint: disable=import-outside-toplevel
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(requests):
      groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
    out: list = [None] * len(requests)
    max_len = self.model.cfg.model.max_seq_len
    for key, index in groups.items():
      kwargs = json.loads(key)
      until = kwargs.get('until', [])
      until = [until] if isinstance(until, str) else list(until)
      # The prompt needs room in the model's window: at most half of it is generated.
      new = min(int(kwargs.get('max_gen_toks', 256)), max(1, max_len // 2))
      temperature = float(kwargs.get('temperature', 0.0)) if kwargs.get('do_sample') else 0.0
      sampling = Sampling(max_new_tokens=new, temperature=temperature,
                          top_k=int(kwargs.get('top_k', 0) or 0),
                          top_p=float(kwargs.get('top_p', 1.0) or 1.0))
      texts = self.model.generator.generate([requests[i].args[0] for i in index], sampling,
                                            stop=until, seed=self.seed, batch_size=self.batch_size,
                                            progress=self._label('generate_until'))
      for i, text in zip(index, texts):
        out[i] = text
    return out


if register_model is not None and __name__ != '__main__':  # `python -m` registers the import below
  register_model('lm')(LMHarnessModel)


def parse_tasks(spec: str) -> list[str]:
  """'hellaswag,my/task.yaml' -> harness task names and absolute YAML paths."""
  _require()
  names = [t.strip() for t in spec.split(',') if t.strip()]
  if not names:
    raise UserError('--harness names no tasks; e.g. --harness hellaswag,arc_easy')
  out = []
  for name in names:
    if name.endswith(('.yaml', '.yml')):
      if not os.path.isfile(name):
        raise UserError(f'harness task file {name} not found')
      name = os.path.abspath(name)
    out.append(name)
  return out


def needs_bundled_index(tasks: list[str]) -> bool:
  """False when every task is a YAML file defining one task by itself (no group, include or
  `!function`): those need no task from lm-eval's own index. A group may list bundled tasks."""
  import yaml  # pylint: disable=import-outside-toplevel
  for name in tasks:
    if not name.endswith(('.yaml', '.yml')):
      return True
    try:
      with open(name, encoding='utf-8') as f:
        spec = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # a `!function` tag too
      return True
    if (not isinstance(spec, dict) or not isinstance(spec.get('task'), str)
        or 'group' in spec or 'include' in spec):
      return True
  return not tasks


def task_manager(tasks: list[str]):
  """The lm_eval TaskManager for `tasks`. Its default one indexes the ~14,700 tasks lm-eval ships
  (6 s on a 2-core CPU) before running any; task files that stand alone are indexed from their
  own folders. Build it once for several runs."""
  _require()
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  # metadata={}: what simple_evaluate gives the manager it builds itself for a model object.
  if needs_bundled_index(tasks):
    return TaskManager(metadata={})
  return TaskManager(include_path=sorted({os.path.dirname(t) for t in tasks}),
                     include_defaults=False, metadata={})


def run_harness(model, tasks: list[str], settings, *, progress: bool = True,
                manager=None) -> dict:
  """{task: {metric: value, 'headline': metric}} of harness tasks on one loaded lm model.
  `manager`: task_manager(tasks), when several models run the same tasks."""
  _require()
  from lm_eval import evaluator  # pylint: disable=import-outside-toplevel
  adapter = LMHarnessModel(model=model, batch_size=settings.batch_size, seed=settings.seed,
                           progress=progress)
  try:
    results = evaluator.simple_evaluate(
        model=adapter, tasks=list(tasks), num_fewshot=settings.shots or None,
        limit=settings.limit or None, log_samples=False, random_seed=settings.seed,
        numpy_random_seed=settings.seed, torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed, bootstrap_iters=0,
        task_manager=manager or task_manager(tasks))
  except KeyError as e:  # an unknown task name
    raise UserError(f'lm-eval-harness: {e.args[0] if e.args else e}; list tasks with '
                    '`lm_eval ls tasks`') from None
  out = {}
  for task, metrics in results['results'].items():
    higher = results.get('higher_is_better', {}).get(task, {})
    values = {}
    for key, value in metrics.items():
      metric, _, filt = key.partition(',')
      # The task's metrics only: not their standard errors, nor sample_len and the like.
      if not isinstance(value, (int, float)) or (higher and metric not in higher):
        continue
      values[metric if filt in ('', 'none') else f'{metric}_{filt}'] = float(value)
    headline = next((m for m in higher if m in values), next(iter(values), ''))
    out[task] = {**values, 'n': results.get('n-samples', {}).get(task, {}).get('effective', 0),
                 'headline': headline}
  return out


def evaluate_runs(run_specs: list[str], harness_tasks: list[str], settings, out_dir: str, *,
                  lm_tasks=(), log=print, progress: bool = True) -> dict:
  """`lm eval --harness`: lm's own tasks and harness tasks on every run, one results table."""
  import dataclasses  # pylint: disable=import-outside-toplevel
  from lm.eval import evaluate  # pylint: disable=import-outside-toplevel
  evaluate.check_output(out_dir, run_specs)
  manager = task_manager(harness_tasks)
  results = {}
  for spec in run_specs:
    model = evaluate.load_model(spec)
    log(f'{model.name}: {model.run_dir} step {model.step}')
    results[model.name] = evaluate.run_tasks(model, list(lm_tasks), settings, log=log,
                                             progress=progress) if lm_tasks else {}
    for task, metrics in run_harness(model, harness_tasks, settings, progress=progress,
                                     manager=manager).items():
      results[model.name][task] = metrics
      head = metrics['headline']
      log(f'  {model.name} {task}: {head} {metrics.get(head, float("nan")):.4g} (lm-eval-harness)')
  table = evaluate.markdown_table(results)
  evaluate.write_results(out_dir, results, {
      'runs': run_specs, 'tasks': [t.path for t in lm_tasks], 'harness_tasks': harness_tasks,
      'settings': dataclasses.asdict(settings)}, table, run_specs)
  return results


def main(argv=None) -> None:
  """The harness's own CLI with model `lm` registered."""
  _require()
  import sys  # pylint: disable=import-outside-toplevel
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  if argv is not None:
    sys.argv = [sys.argv[0], *argv]
  cli_evaluate()


if __name__ == '__main__':
  from lm.eval import harness as _registered  # the package's module, so `lm` is its class
  _registered.main()
