"""The task file format: a YAML file parsed into a Task, checked (unknown keys, a key its kind
needs, bad values), and the records it names, rendered through its templates with one-line errors
that name the file, the record and the fix. Running tasks: lm/eval/tasks.py; the format's reference:
docs/evaluation.md, 'Your own tasks: task files'."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import os
import re

import jinja2
import yaml

from lm.eval.task_data import shared_data
from lm.errors import UserError

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'task_files')
KINDS = ('perplexity', 'generate', 'choice', 'preference')
GENERATE_METRICS = ('exact_match', 'token_f1', 'rouge_l', 'bleu')


# --- the file format ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Task:
  """One task file, parsed. Field meanings: docs/evaluation.md, 'Task files'."""
  name: str
  path: str
  kind: str
  data: str
  rows: str = ''  # a Python slice of the records, '-500:' = the last 500
  text_split: str = 'paragraph'  # text files: paragraph | line | file
  text: str = 'text'  # perplexity: the text of a record
  prompt: str = ''
  target: str = ''
  choices: object = None  # a field holding a list, or a list of fields / literal strings
  label: str = ''  # a field: the right choice's index or text
  label_file: str = ''  # or a file of labels, one per line, in record order
  fields: dict = dataclasses.field(default_factory=dict)  # preference: prompt/chosen/rejected names
  fewshot: str = ''  # exemplars: a data file (same forms as `data`)
  fewshot_rows: str = ''
  shots: int = 0  # exemplars by default (the run's `shots` setting replaces it when > 0)
  target_delimiter: str = ' '
  fewshot_delimiter: str = '\n\n'
  stop: tuple = ()
  answer_pattern: str = ''  # 'number' (GSM8K's `#### N`, else the last number) or a regex
  metrics: tuple = GENERATE_METRICS
  max_new_tokens: int = 0  # 0: the run's setting
  limit: int = 0  # the task's own cap on examples (0: none)
  limit_by: str = 'records'  # perplexity: 'windows' counts model windows spread over all texts
  seed: int | None = None  # None: the run's seed
  beta: float = 0.0  # preference: 0 takes the run's dpo.beta
  headline: str = ''  # the figure tables rank by; default per kind

  @property
  def headline_metric(self) -> str:
    if self.headline:
      return self.headline
    if self.kind == 'perplexity':
      return 'answer_perplexity' if self.prompt else 'perplexity'
    if self.kind == 'generate':
      return self.metrics[0]
    return {'choice': 'accuracy', 'preference': 'reward_accuracy'}[self.kind]



_FIELDS = {f.name for f in dataclasses.fields(Task)} - {'path'}  # the keys a file may set
_REQUIRED = {'perplexity': (), 'generate': ('prompt', 'target'),
             'choice': ('prompt', 'choices'), 'preference': ()}


def load_task(path: str) -> Task:
  """A task file, checked: unknown keys, a missing key for its kind, bad values raise UserError."""
  try:
    with open(path, encoding='utf-8') as f:
      raw = yaml.safe_load(f)
  except OSError as e:
    raise UserError(f'task file {path}: cannot read it ({e.strerror})') from None
  except yaml.YAMLError as e:
    raise UserError(f'task file {path}: not valid YAML ({str(e).splitlines()[0]})') from None
  if not isinstance(raw, dict):
    raise UserError(f'task file {path}: expected a mapping of keys (kind, data, prompt, ...)')
  unknown = sorted(set(raw) - _FIELDS)
  if unknown:
    raise UserError(f'task file {path}: unknown key(s) {unknown}; known: {sorted(_FIELDS)}')
  kind = raw.get('kind')
  if kind not in KINDS:
    raise UserError(f'task file {path}: kind is {kind!r}; set kind to one of {list(KINDS)}')
  if 'data' not in raw:
    raise UserError(f'task file {path}: no data; set data to the file of examples')
  missing = [k for k in _REQUIRED[kind] if not raw.get(k)]
  if kind == 'choice' and not raw.get('label') and not raw.get('label_file'):
    missing.append('label (or label_file)')
  if missing:
    raise UserError(f'task file {path}: a {kind} task needs {", ".join(missing)}')
  fewshot = raw.pop('fewshot', '') or ''
  if isinstance(fewshot, dict):
    raw['fewshot_rows'] = str(fewshot.get('rows', ''))
    raw['shots'] = int(fewshot.get('shots', raw.get('shots', 0)))
    fewshot = fewshot.get('data', '')
  for key in ('stop', 'metrics'):
    if key in raw:
      value = raw[key]
      raw[key] = tuple([value] if isinstance(value, str) else value)
  bad = [m for m in raw.get('metrics', ()) if m not in GENERATE_METRICS]
  if bad:
    raise UserError(f'task file {path}: unknown metric(s) {bad}; choose from {list(GENERATE_METRICS)}')
  if raw.get('shots') and not fewshot:
    raise UserError(f'task file {path}: shots is {raw["shots"]} but there is no fewshot data; add '
                    '`fewshot: FILE` (exemplars) or drop shots')
  if raw.get('limit_by', 'records') not in ('records', 'windows'):
    raise UserError(f'task file {path}: limit_by is {raw["limit_by"]!r}; choose records or windows')
  raw['rows'] = str(raw.get('rows', '') or '')
  name = str(raw.pop('name', '') or os.path.splitext(os.path.basename(path))[0])
  try:
    return Task(name=name, path=os.path.abspath(path), fewshot=fewshot, **raw)
  except TypeError as e:
    raise UserError(f'task file {path}: {e}') from None


def builtin_tasks() -> list[str]:
  return sorted(f[:-5] for f in os.listdir(BUILTIN_DIR) if f.endswith('.yaml'))


def resolve(spec) -> Task:
  """A Task from a built-in name (gsm8k), a task file path, or a Task."""
  if isinstance(spec, Task):
    return spec
  if spec.endswith(('.yaml', '.yml')) or os.sep in spec:
    if not os.path.isfile(spec):
      raise UserError(f'task file {spec} not found')
    return load_task(spec)
  path = os.path.join(BUILTIN_DIR, f'{spec}.yaml')
  if not os.path.isfile(path):
    raise UserError(f'unknown task {spec!r}; name a task file (my_task.yaml) or one of '
                    f'{builtin_tasks()}')
  return load_task(path)


def parse_tasks(spec: str) -> list[Task]:
  """'gsm8k,my_task.yaml' -> tasks, each checked."""
  names = [t.strip() for t in spec.split(',') if t.strip()]
  if not names:
    raise UserError(f'no tasks in {spec!r}; name task files or built-in tasks {builtin_tasks()}')
  tasks = [resolve(n) for n in names]
  seen = [t.name for t in tasks]
  dup = sorted({n for n in seen if seen.count(n) > 1})
  if dup:
    raise UserError(f'two tasks are named {dup}; set a distinct `name` in one of the task files')
  return tasks


# --- records ------------------------------------------------------------------------------------

class Records:
  """A task's records with where each came from, for error messages."""

  def __init__(self, items: list, where):
    self.items, self._where = items, where

  def __len__(self):
    return len(self.items)

  def where(self, i: int) -> str:
    return self._where(i)


def _slice(rows: str, n: int, where: str) -> range:
  if not rows:
    return range(n)
  try:
    parts = [int(p) if p.strip() else None for p in rows.split(':')]
    if len(parts) != 2:
      raise ValueError
  except ValueError:
    raise UserError(f'{where}: rows is {rows!r}; write a slice such as "-500:" or ":100"') from None
  return range(n)[slice(*parts)]


def load_records(task: Task, data: str, rows: str, settings) -> Records:
  """The records `data` names: a file (relative to the task file), shared:PATH, python:MOD:FN."""
  from lm.data import sources  # pylint: disable=import-outside-toplevel
  if data.startswith('python:'):
    module, _, fn = data[len('python:'):].rpartition(':')
    try:
      items = list(getattr(importlib.import_module(module), fn)(settings))
    except (ImportError, AttributeError) as e:
      raise UserError(f'task file {task.path}: data {data!r} cannot be loaded ({e}); write '
                      'python:MODULE:FUNCTION') from None
    records = Records(items, lambda i: f'{data}[{i}]')
  else:
    if data.startswith('shared:'):
      path = shared_data(data[len('shared:'):])
    else:
      path = os.path.join(os.path.dirname(task.path), os.path.expanduser(data))
      if not os.path.isfile(path):
        raise UserError(f'task file {task.path}: data file {path} not found; data is read '
                        'relative to the task file')
    source = sources.load(path, text_split=task.text_split)
    records = Records([source[i] for i in range(len(source))], source.where)
  index = _slice(rows, len(records), f'task file {task.path}')
  return Records([records.items[i] for i in index], lambda i: records.where(index[i]))


_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                          autoescape=False)
_ENV.filters['regex_replace'] = lambda s, pattern, repl='': re.sub(pattern, repl, s)
_NAME = re.compile(r'^[A-Za-z_][\w.-]*$')


@functools.lru_cache(maxsize=256)
def _template(source: str):
  return _ENV.from_string(source)


def render(task: Task, key: str, template, record: dict, where: str):
  """A template (Jinja2, like the harness's doc_to_text) or a bare field name, over one record."""
  if not isinstance(record, dict):
    raise UserError(f'{where}: expected a record (object), got {type(record).__name__}')
  if isinstance(template, str) and _NAME.match(template) and '{' not in template:
    if template not in record:
      raise UserError(f'{where}: no field {template!r} (the record has {sorted(record)}); fix '
                      f'`{key}` in {task.path}')
    return record[template]
  try:
    return _template(template).render(**record)
  except jinja2.UndefinedError as e:
    raise UserError(f'{where}: {e.message} (the record has {sorted(record)}); fix `{key}` in '
                    f'{task.path}') from None
  except jinja2.TemplateError as e:
    raise UserError(f'{task.path}: `{key}` is not a valid template ({e})') from None


def render_text(task, key, record, where) -> str:
  value = render(task, key, getattr(task, key), record, where)
  if not isinstance(value, str):
    raise UserError(f'{where}: `{key}` gives {type(value).__name__}, expected text; fix `{key}` '
                    f'in {task.path}')
  return value


def choices_of(task: Task, record: dict, where: str) -> list[str]:
  spec = task.choices
  if isinstance(spec, (list, tuple)):
    out = [record[c] if isinstance(c, str) and c in record else c for c in spec]
  else:
    out = render(task, 'choices', spec, record, where)
    if isinstance(out, str):
      try:
        out = ast.literal_eval(out)
      except (ValueError, SyntaxError):
        out = None
  if not isinstance(out, (list, tuple)) or len(out) < 2 or not all(isinstance(c, str) for c in out):
    raise UserError(f'{where}: `choices` must give a list of two or more strings, got {out!r}; fix '
                    f'`choices` in {task.path}')
  return list(out)


def label_index(value, choices: list[str], where: str, fix: str) -> int:
  if isinstance(value, str) and value.strip().lstrip('-').isdigit():
    value = int(value.strip())
  if isinstance(value, bool) or not isinstance(value, (int, str)):
    raise UserError(f'{where}: label {value!r} is neither a choice index nor a choice; {fix}')
  if isinstance(value, str):
    if value not in choices:
      raise UserError(f'{where}: label {value!r} is not one of the choices {choices}; {fix}')
    return choices.index(value)
  if not 0 <= value < len(choices):
    raise UserError(f'{where}: label {value} is outside the {len(choices)} choices (0-'
                    f'{len(choices) - 1}); {fix}')
  return value


def labels_from_file(task: Task, settings):
  """(labels, where) of the label file, one line per record of the whole data file, taken
  through the same `rows` slice as the records."""
  path = os.path.join(os.path.dirname(task.path), task.label_file)
  try:
    with open(path, encoding='utf-8') as f:
      labels = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise UserError(f'task file {task.path}: label_file {path}: {e.strerror}') from None
  n_data = len(load_records(task, task.data, '', settings))
  if len(labels) != n_data:
    raise UserError(f'{path}: {len(labels)} labels for {n_data} records in {task.data}; give one '
                    'label per record, in order')
  index = _slice(task.rows, n_data, f'task file {task.path}')
  return [labels[i] for i in index], lambda i: f'{path}:{index[i] + 1}'


def limit_of(task: Task, settings) -> int:
  limits = [n for n in (task.limit, settings.limit) if n]
  return min(limits) if limits else 0
