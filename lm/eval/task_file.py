"""The task file format: a YAML file parsed into a Task, checked (unknown keys, a key its kind
needs, bad values), and the records it names, rendered through its templates with one-line errors
that name the file, the record and the fix. Running tasks: lm/eval/tasks.py; the format's reference:
docs/evaluation.md, 'Your own tasks: task files'."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import math
import os
import re

import jinja2
import yaml

from lm.data import chat, templates
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
  stride: int = 0  # perplexity: tokens scored per window (0: the run's --config.stride)
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
_COMMON = {'kind', 'data', 'rows', 'text_split', 'name', 'limit', 'seed', 'headline'}
_SHOTS = {'fewshot', 'fewshot_rows', 'shots', 'target_delimiter', 'fewshot_delimiter'}
# The keys each kind reads: a key its kind ignores is a mistake to report, not to drop silently.
_KEYS = {'perplexity': _COMMON | _SHOTS | {'text', 'prompt', 'target', 'limit_by', 'stride'},
         'generate': _COMMON | _SHOTS | {'prompt', 'target', 'stop', 'answer_pattern', 'metrics',
                                        'max_new_tokens'},
         'choice': _COMMON | _SHOTS | {'prompt', 'choices', 'label', 'label_file'},
         'preference': _COMMON | {'fields', 'beta'}}
# The figures each kind reports (`headline` must name one).
REPORTS = {'perplexity': ('perplexity', 'nll', 'word_perplexity', 'bits_per_byte', 'answer_perplexity',
                          'answer_nll', 'answer_bits_per_byte'),
           'generate': (*GENERATE_METRICS, 'answered'),
           'choice': ('accuracy', 'accuracy_norm'),
           'preference': ('reward_accuracy', 'reward_margin', 'chosen_reward', 'rejected_reward',
                          'logp_accuracy', 'chosen_logp', 'rejected_logp')}
PREFERENCE_FIELDS = ('prompt', 'chosen', 'rejected', 'conversations', 'system')
TEXT_SPLITS = ('paragraph', 'line', 'file')
_TASK_NAME = re.compile(r'^[A-Za-z0-9_][\w.-]*$')


def load_task(path: str) -> Task:
  """A task file, checked as a config is: unknown keys, keys its kind does not read, a missing
  key, wrong types and values, templates that do not parse, regexes that do not compile, rows
  that are not a slice and files that do not exist raise UserError before anything runs."""
  try:
    with open(path, encoding='utf-8') as f:
      raw = yaml.safe_load(f)
  except OSError as e:
    raise UserError(f'task file {path}: cannot read it ({e.strerror})') from None
  except UnicodeDecodeError as e:
    raise UserError(f'task file {path}: byte {e.start} is not valid UTF-8; save it as UTF-8') from None
  except yaml.YAMLError as e:
    raise UserError(f'task file {path}: not valid YAML ({str(e).splitlines()[0]})') from None
  if not isinstance(raw, dict):
    raise UserError(f'task file {path}: expected a mapping of keys (kind, data, prompt, ...)')
  return check(raw, path)


def check(raw: dict, path: str) -> Task:
  """A Task from a task file's mapping, validated (the schema: docs/evaluation.md, 'Keys')."""
  def bad(message):
    return UserError(f'task file {path}: {message}')

  raw = dict(raw)
  unknown = sorted(str(k) for k in set(raw) - _FIELDS)
  if unknown:
    raise bad(f'unknown key(s) {unknown}; known: {sorted(_FIELDS)}')
  kind = raw.get('kind')
  if kind not in KINDS:
    raise bad(f'kind is {kind!r}; set kind to one of {list(KINDS)}')
  foreign = sorted(set(raw) - _KEYS[kind])
  if foreign:
    keys = ', '.join(f'`{k}`' for k in foreign)
    raise bad(f'{keys} {"is" if len(foreign) == 1 else "are"} not read by a {kind} task; remove '
              f'{"it" if len(foreign) == 1 else "them"} (a {kind} task reads {sorted(_KEYS[kind])})')
  if not isinstance(raw.get('data'), str) or not raw['data'].strip():
    raise bad('no data; set data to the file of examples')
  missing = [k for k in _REQUIRED[kind] if not raw.get(k)]
  if kind == 'choice' and not raw.get('label') and not raw.get('label_file'):
    missing.append('label (or label_file)')
  if missing:
    raise bad(f'a {kind} task needs {", ".join(missing)}')
  if raw.get('label') and raw.get('label_file'):
    raise bad('both label and label_file are set; keep one')
  if raw['data'] == 'heldout' and kind != 'perplexity':
    raise bad(f'data: heldout is a perplexity task\'s; a {kind} task needs records')
  if raw['data'].startswith('python:') and not _is_builtin(path):
    raise bad(f'data {raw["data"]!r} would run Python code, and task files are data: only lm\'s '
              'built-in task files may name python: data; write the records to a .jsonl file '
              '(or build a Task in Python, which is code you run)')

  fewshot = raw.pop('fewshot', '') or ''
  if isinstance(fewshot, dict):
    extra = sorted(set(fewshot) - {'data', 'rows', 'shots'})
    if extra:
      raise bad(f'fewshot has unknown key(s) {extra}; it takes data, rows and shots')
    raw['fewshot_rows'] = fewshot.get('rows', '')
    if 'shots' in fewshot:
      raw['shots'] = fewshot['shots']
    fewshot = fewshot.get('data', '')
  if not isinstance(fewshot, str):
    raise bad(f'fewshot is {type(fewshot).__name__}; give a data file or {{data: FILE, rows: SLICE}}')
  if fewshot.startswith('python:') and not _is_builtin(path):
    raise bad(f'fewshot {fewshot!r} would run Python code; write the exemplars to a .jsonl file')

  for key in ('limit', 'shots', 'max_new_tokens', 'stride'):
    if key in raw:
      raw[key] = _whole(raw[key], f'{key}', bad, minimum=0)
  if raw.get('seed') is not None:
    raw['seed'] = _whole(raw['seed'], 'seed', bad, minimum=0)
  if 'beta' in raw:
    beta = raw['beta']
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
      raise bad(f'beta is {beta!r}; give a finite number >= 0 (0: the run\'s dpo.beta)')
    raw['beta'] = float(beta)
  for key in ('rows', 'fewshot_rows'):
    if key in raw:
      value = raw[key]
      if value is None or isinstance(value, bool) or not isinstance(value, (str, int)):
        raise bad(f'{key} is {value!r}; write a slice such as "-500:" or ":100"')
      raw[key] = str(value)
      _bounds(raw[key], f'task file {path}')  # a slice, or the error
  for key in ('text', 'prompt', 'target', 'label', 'target_delimiter', 'fewshot_delimiter',
              'label_file', 'headline', 'answer_pattern', 'name'):
    if key in raw and not isinstance(raw[key], str):
      raise bad(f'{key} is {type(raw[key]).__name__} ({raw[key]!r}); give text')
  for key in ('stop', 'metrics'):
    if key in raw:
      value = raw[key]
      value = [value] if isinstance(value, str) else value
      if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise bad(f'{key} is {raw[key]!r}; give a list of non-empty strings')
      raw[key] = tuple(value)
  bad_metrics = [m for m in raw.get('metrics', ()) if m not in GENERATE_METRICS]
  if bad_metrics:
    raise bad(f'unknown metric(s) {bad_metrics}; choose from {list(GENERATE_METRICS)}')
  if raw.get('shots') and not fewshot:
    raise bad(f'shots is {raw["shots"]} but there is no fewshot data; add `fewshot: FILE` '
              '(exemplars) or drop shots')
  if raw.get('limit_by', 'records') not in ('records', 'windows'):
    raise bad(f'limit_by is {raw["limit_by"]!r}; choose records or windows')
  if raw.get('text_split', 'paragraph') not in TEXT_SPLITS:
    raise bad(f'text_split is {raw["text_split"]!r}; choose one of {list(TEXT_SPLITS)}')
  if raw.get('headline') and raw['headline'] not in REPORTS[kind]:
    raise bad(f'headline is {raw["headline"]!r}, which a {kind} task does not report; choose one '
              f'of {list(REPORTS[kind])}')
  pattern = raw.get('answer_pattern', '')
  if pattern and pattern != 'number':
    try:
      re.compile(pattern)
    except re.error as e:
      raise bad(f'answer_pattern {pattern!r} is not a valid regex ({e}); write `number` or a '
                'regex whose group 1 is the answer') from None
  if 'choices' in raw:
    choices = raw['choices']
    if isinstance(choices, list):
      if len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise bad(f'choices is {choices!r}; give two or more fields (or literal strings), or one '
                  'field or template giving the list')
      raw['choices'] = tuple(choices)
    elif not isinstance(choices, str):
      raise bad(f'choices is {type(choices).__name__}; give a list of fields or one field/template')
  if 'fields' in raw:
    fields = raw['fields']
    if not isinstance(fields, dict) or not all(isinstance(v, str) and v for v in fields.values()):
      raise bad(f'fields is {fields!r}; give {{prompt: COLUMN, chosen: COLUMN, rejected: COLUMN}}')
    extra = sorted(set(fields) - set(PREFERENCE_FIELDS))
    if extra:
      raise bad(f'fields has unknown name(s) {extra}; choose from {list(PREFERENCE_FIELDS)}')
  name = raw.pop('name', '') or os.path.splitext(os.path.basename(path))[0]
  if not _TASK_NAME.match(name):
    raise bad(f'name {name!r} is not a plain name (letters, digits, _ . -); it becomes '
              'NAME/metric in logs, so set `name` to one')
  for key in ('text', 'prompt', 'target', 'label', 'choices'):
    source = raw.get(key)
    if isinstance(source, str) and source and not _NAME.match(source):
      _parse_template(source, key, path)
  if raw.get('label_file'):
    label_path = os.path.join(os.path.dirname(os.path.abspath(path)), raw['label_file'])
    if not os.path.isfile(label_path):
      raise bad(f'label_file {label_path} not found; it is read relative to the task file')
  for value, key in ((raw['data'], 'data'), (fewshot, 'fewshot')):
    if value and not value.startswith(('python:', 'shared:')) and value != 'heldout':
      file = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(value))
      if not os.path.isfile(file):
        raise bad(f'{key} file {file} not found; data is read relative to the task file')
  return Task(name=name, path=os.path.abspath(path), fewshot=fewshot, **raw)


def _whole(value, key: str, bad, minimum: int) -> int:
  """An integer setting: YAML's `true`, `2.5` or `'3'` are refused, not coerced."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise bad(f'{key} is {value!r}; give a whole number >= {minimum}')
  if value < minimum:
    raise bad(f'{key} is {value}; it must be >= {minimum}' + (' (0: no cap)' if key == 'limit' else ''))
  return value


def _is_builtin(path: str) -> bool:
  """Task files shipped inside lm are code reviewed with it; everyone else's are data."""
  return os.path.dirname(os.path.realpath(path)) == os.path.realpath(BUILTIN_DIR)


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


def _bounds(rows: str, where: str) -> tuple:
  """'-500:' -> (-500, None): the two ends of a slice (no step), or UserError."""
  try:
    parts = tuple(int(p) if p.strip() else None for p in rows.split(':'))
    if len(parts) != 2:
      raise ValueError
  except ValueError:
    raise UserError(f'{where}: rows is {rows!r}; write a slice such as "-500:" or ":100"') from None
  return parts


def select(rows: str, n: int, where: str, what: str) -> range:
  """The records `rows` selects out of `n`. A bound past the end, or a selection of none, is an
  error: Python's slicing would quietly score fewer (or no) records than the file asked for."""
  if not n:
    raise UserError(f'{where}: {what} holds no records; give a file with examples')
  if not rows:
    return range(n)
  parts = _bounds(rows, where)
  if any(p is not None and not -n <= p <= n for p in parts):
    raise UserError(f'{where}: rows {rows!r} reaches past the {n} records of {what}; keep its '
                    f'bounds within -{n}..{n}')
  index = range(n)[slice(*parts)]
  if not index:
    raise UserError(f'{where}: rows {rows!r} selects none of the {n} records of {what}; fix rows')
  return index


def load_records(task: Task, data: str, rows: str, settings) -> Records:
  """The records `data` names: a file (relative to the task file), shared:PATH, python:MOD:FN."""
  from lm.data import sources  # pylint: disable=import-outside-toplevel
  if data.startswith('python:'):
    records = Records(_call_hook(task, data, settings), lambda i: f'{data}[{i}]')
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
  index = select(rows, len(records), f'task file {task.path}', data)
  return Records([records.items[i] for i in index], lambda i: records.where(index[i]))


def _call_hook(task: Task, data: str, settings) -> list:
  """The records a `python:MODULE:FUNCTION` hook returns (built-in task files, and Tasks built in
  Python): a failure inside it is one line naming the hook, never an internal error."""
  module, _, fn = data[len('python:'):].rpartition(':')
  try:
    hook = getattr(importlib.import_module(module), fn)
  except (ImportError, AttributeError, ValueError) as e:
    raise UserError(f'task file {task.path}: data {data!r} cannot be loaded ({e}); write '
                    'python:MODULE:FUNCTION') from None
  try:
    items = list(hook(settings))
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'task file {task.path}: data hook {data} failed: {type(e).__name__}: '
                    f'{(str(e).splitlines() or [""])[0]}; fix the hook or its data') from None
  odd = next((i for i, r in enumerate(items) if not isinstance(r, dict)), None)
  if odd is not None:
    raise UserError(f'task file {task.path}: data hook {data} returned a '
                    f'{type(items[odd]).__name__} at [{odd}]; it must return records (dicts)')
  return items


_ENV = templates.environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                             autoescape=False)
_ENV.filters['regex_replace'] = lambda s, pattern, repl='': re.sub(pattern, repl, s)
_NAME = re.compile(r'^[A-Za-z_][\w.-]*$')


@functools.lru_cache(maxsize=256)
def _template(source: str):
  return _ENV.from_string(source)


def _parse_template(source: str, key: str, path: str) -> None:
  try:
    _template(source)
  except jinja2.TemplateError as e:
    raise UserError(f'task file {path}: `{key}` is not a valid template ({e}); fix it') from None


def render(task: Task, key: str, template, record: dict, where: str):
  """A template (Jinja2, like the harness's doc_to_text) or a bare field name, over one record."""
  if not isinstance(record, dict):
    raise UserError(f'{where}: expected a record (object), got {type(record).__name__}')
  chat.check_unicode(record, where)  # the file and line, not the tokenizer's failure later
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
  except templates.security_error() as e:  # the sandbox: a template may only read its record
    raise UserError(f'{where}: `{key}` in {task.path} reaches outside the record ({e}); a task '
                    'template may only read fields and apply filters') from None
  except jinja2.TemplateError as e:
    raise UserError(f'{task.path}: `{key}` is not a valid template ({e})') from None
  except Exception as e:  # pylint: disable=broad-except  # 1/0, a bad regex_replace pattern, ...
    raise UserError(f'{where}: `{key}` failed on this record ({type(e).__name__}: '
                    f'{(str(e).splitlines() or [""])[0]}); fix `{key}` in {task.path}') from None


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
  except UnicodeDecodeError as e:
    raise UserError(f'{path}: byte {e.start} is not valid UTF-8; save the labels as UTF-8') from None
  n_data = len(load_records(task, task.data, '', settings))
  if len(labels) != n_data:
    raise UserError(f'{path}: {len(labels)} labels for {n_data} records in {task.data}; give one '
                    'label per record, in order')
  index = select(task.rows, n_data, f'task file {task.path}', task.data)
  return [labels[i] for i in index], lambda i: f'{path}:{index[i] + 1}'


def limit_of(task: Task, settings) -> int:
  """The examples to score: the smaller of the task's own `limit` and the run's (0: no cap)."""
  limits = [n for n in (task.limit, settings.limit) if n]
  return min(limits) if limits else 0
