"""Evaluation tasks as files: a short YAML file says where the examples are, how a record becomes a
prompt and an answer, and which of five kinds of test it is. The built-in tasks are such files
(lm/eval/task_files/*.yaml); a user's own task is one more file, usable wherever a built-in name is
(`lm eval --tasks my_task.yaml`, `lm compare`, `train.eval_tasks`, early stopping).

  perplexity   the text's perplexity per token, per word and in bits per byte; given a `prompt`,
               the perplexity of the `target` after it (answer_perplexity, ...)
  generate     generate after `prompt`; exact match (after `answer_pattern`), token F1, ROUGE-L,
               BLEU against `target`
  choice       multiple choice: the choice with the highest log-probability after `prompt`
               (accuracy; accuracy_norm per token)
  preference   chosen/rejected pairs: implicit reward beta*(log pi - log pi_ref) against the run's
               reference (its train.init_from): reward accuracy and margin
  (heldout perplexity: `data: heldout`, a run's own held-out split as training packs it)

Why not lm-eval-harness YAML as the format: the harness needs its `datasets` stack and cannot express
labels in a separate file, preference pairs against a reference model, or a run's own held-out
split; lm's files run inside training without it. The key names follow the harness where the
meaning is the same, templates are Jinja2 like the harness's, and any harness task (or harness YAML)
runs through `lm eval --harness` (lm/eval/harness.py). docs/evaluation.md is the reference.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import math
import os
import re

import jinja2
import numpy as np
import yaml

from lm.eval import text_metrics as tm
from lm.eval.task_data import shared_data
from lm.errors import UserError
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'task_files')
KINDS = ('perplexity', 'generate', 'choice', 'preference')
GENERATE_METRICS = ('exact_match', 'token_f1', 'rouge_l', 'bleu')
HELDOUT = 'heldout'  # `data: heldout`: a run's own held-out split


@dataclasses.dataclass(frozen=True)
class Settings:
  limit: int = 100  # examples per task (0: all); a task file's own `limit` caps it further
  shots: int = 0  # solved exemplars before each prompt (tasks with `fewshot` data)
  max_new_tokens: int = 160
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 16
  seed: int = 0
  heldout_from: str = ''  # `data: heldout` tasks: whose held-out split ('' = the model's own run)


def lower_is_better(metric: str) -> bool:
  return any(s in metric for s in ('loss', 'perplexity', 'nll', 'bits_per_byte'))


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


def load_records(task: Task, data: str, rows: str, settings: Settings) -> Records:
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


def _text(task, key, record, where) -> str:
  value = render(task, key, getattr(task, key), record, where)
  if not isinstance(value, str):
    raise UserError(f'{where}: `{key}` gives {type(value).__name__}, expected text; fix `{key}` '
                    f'in {task.path}')
  return value


def _choices(task: Task, record: dict, where: str) -> list[str]:
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


def _label(value, choices: list[str], where: str, fix: str) -> int:
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


def _labels_from_file(task: Task, settings: Settings):
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


def _limit(task: Task, settings: Settings) -> int:
  limits = [n for n in (task.limit, settings.limit) if n]
  return min(limits) if limits else 0


# --- running ------------------------------------------------------------------------------------

def _split_encode(tokenizer, context: str, continuation: str):
  """(context ids with BOS, continuation ids) such that together they encode context+continuation."""
  ctx = tokenizer.encode(context, bos=True)
  full = tokenizer.encode(context + continuation, bos=True)
  if full[:len(ctx)] == ctx and len(full) > len(ctx):
    return ctx, full[len(ctx):]
  return ctx, tokenizer.encode(continuation)


def _shots_prefix(task: Task, settings: Settings, answer) -> str:
  """k solved exemplars, each prompt + delimiter + its answer, then the few-shot delimiter."""
  shots = settings.shots or task.shots
  if not shots or not task.fewshot:  # a task without exemplars runs zero-shot
    return ''
  records = load_records(task, task.fewshot, task.fewshot_rows, settings)
  out = []
  for i in range(min(shots, len(records))):
    where = records.where(i)
    out.append(_text(task, 'prompt', records.items[i], where) + task.target_delimiter
               + answer(records.items[i], where) + task.fewshot_delimiter)
  return ''.join(out)


def run(task, model, settings: Settings, *, progress: bool = False) -> dict:
  """{metric: value} of one task on one model; `headline` names the figure tables rank by."""
  task = resolve(task)
  if task.seed is not None:
    settings = dataclasses.replace(settings, seed=task.seed)
  runner = {'perplexity': _perplexity, 'generate': _generate, 'choice': _choice,
            'preference': _preference}[task.kind]
  desc = f'{model.name} {task.name}' if progress else ''
  return {**runner(task, model, settings, desc), 'headline': task.headline_metric}


def _records(task: Task, settings: Settings) -> Records:
  records = load_records(task, task.data, task.rows, settings)
  n = _limit(task, settings)
  if n and task.limit_by == 'records':
    return Records(records.items[:n], records.where)
  return records


def _perplexity(task: Task, model, settings: Settings, desc: str) -> dict:
  if task.data == HELDOUT:
    return _heldout(model, settings, desc)
  records = _records(task, settings)
  if task.prompt:  # the target given the prompt
    prefix = _shots_prefix(task, settings, lambda r, w: _text(task, 'target', r, w))
    requests, chars = [], 0
    for i, r in enumerate(records.items):
      where = records.where(i)
      target = task.target_delimiter + _text(task, 'target', r, where)
      requests.append(_split_encode(model.tokenizer, prefix + _text(task, 'prompt', r, where), target))
      chars += len(target.encode('utf-8'))
    scores = model.scorer.score(requests, batch_size=settings.batch_size, progress=desc)
    logp, tokens = sum(s[0] for s in scores), sum(s[1] for s in scores)
    nll = -logp / max(tokens, 1)
    return {'answer_perplexity': float(np.exp(min(nll, 50.0))), 'answer_nll': nll,
            'answer_bits_per_byte': -logp / math.log(2) / max(chars, 1), 'n': len(requests)}
  texts = [_text(task, 'text', r, records.where(i)) for i, r in enumerate(records.items)]
  docs = [model.tokenizer.encode(t, bos=True, eos=True) for t in texts]
  n = _limit(task, settings)
  if n and task.limit_by == 'windows':  # the first `n` windows' worth of tokens, over all texts
    per = max(1, n * model.cfg.data.seq_len // max(len(docs), 1))
    docs = [d[:per + 1] for d in docs]
    texts = [model.tokenizer.decode([i for i in d if i not in (model.tokenizer.bos_id,
                                                               model.tokenizer.eos_id)])
             for d in docs]
  out = model.scorer.perplexity(docs, batch_size=settings.batch_size, progress=desc)
  total = out['nll'] * out['tokens']
  words = sum(len(t.split()) for t in texts)
  chars = sum(len(t.encode('utf-8')) for t in texts)
  return {**out, 'word_perplexity': math.exp(min(total / max(words, 1), 50.0)),
          'bits_per_byte': total / math.log(2) / max(chars, 1), 'words': words, 'bytes': chars,
          'n': len(docs)}


def _heldout(model, settings: Settings, desc: str) -> dict:
  from lm.data import pipeline  # pylint: disable=import-outside-toplevel
  from lm.eval.evaluate import load_config  # pylint: disable=import-outside-toplevel
  data_cfg = load_config(settings.heldout_from).data if settings.heldout_from else model.cfg.data
  rows = pipeline.build_corpus(data_cfg, model.tokenizer).eval
  if settings.limit:
    rows = {k: v[:settings.limit] for k, v in rows.items()}
  del desc  # one pass over packed rows; quick
  return model.scorer.perplexity_of_rows(rows, batch_size=settings.batch_size)


def extract(task: Task, text: str) -> str:
  if task.answer_pattern == 'number':
    return tm.extract_answer(text)
  found = re.search(task.answer_pattern, text)
  if not found:
    return ''
  return (found.group(1) if found.groups() else found.group(0)).strip()


def _generate(task: Task, model, settings: Settings, desc: str) -> dict:
  from lm.eval.generate import Sampling  # pylint: disable=import-outside-toplevel
  records = _records(task, settings)
  prefix = _shots_prefix(task, settings, lambda r, w: _text(task, 'target', r, w))
  prompts = [_text(task, 'prompt', r, records.where(i)) for i, r in enumerate(records.items)]
  refs = [_text(task, 'target', r, records.where(i)) for i, r in enumerate(records.items)]
  sampling = Sampling(max_new_tokens=task.max_new_tokens or settings.max_new_tokens,
                      temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
  outs = model.generator.generate([prefix + p for p in prompts], sampling, stop=list(task.stop),
                                  seed=settings.seed, batch_size=settings.batch_size, progress=desc)
  out = {}
  if task.answer_pattern:
    answers = [extract(task, o) for o in outs]
    gold = [extract(task, r) or r.strip() for r in refs]
  else:
    answers, gold = [o.strip() for o in outs], [r.strip() for r in refs]
  scorers = {'exact_match': lambda: tm.exact_match(answers, gold),
             'token_f1': lambda: tm.token_f1(outs, refs), 'rouge_l': lambda: tm.rouge_l(outs, refs),
             'bleu': lambda: tm.bleu(outs, refs)}
  for metric in task.metrics:
    out[metric] = scorers[metric]()
  if task.answer_pattern:
    out['answered'] = 100.0 * float(np.mean([a != '' for a in answers])) if answers else 0.0
  out['n'] = len(prompts)
  out['examples'] = [{'prompt': p, 'output': o, 'answer': a, 'gold': g}
                     for p, o, a, g in list(zip(prompts, outs, answers, gold))[:3]]
  return out


def _choice(task: Task, model, settings: Settings, desc: str) -> dict:
  records = _records(task, settings)
  labels, label_where = None, None
  if task.label_file:
    labels, label_where = _labels_from_file(task, settings)

  def answer(record, where):  # an exemplar's right choice
    options = _choices(task, record, where)
    return options[_label(render(task, 'label', task.label, record, where), options, where,
                          f'fix the record or `label` in {task.path}')]

  prefix = _shots_prefix(task, settings, answer)
  items = []
  for i, r in enumerate(records.items):
    where = records.where(i)
    options = _choices(task, r, where)
    if labels is not None:
      right = _label(labels[i], options, f'{label_where(i)} (for {where})',
                     'give a choice index (0-based) or the text of a choice')
    else:
      right = _label(render(task, 'label', task.label, r, where), options, where,
                     f'fix the record, or `label` in {task.path}')
    context = prefix + _text(task, 'prompt', r, where)
    ctx = model.tokenizer.encode(context, bos=True)
    opts = [_split_encode(model.tokenizer, context, task.target_delimiter + o)[1] for o in options]
    items.append((ctx, opts, right))
  return {**model.scorer.multiple_choice(items, batch_size=settings.batch_size, progress=desc),
          'n': len(items)}


def _preference(task: Task, model, settings: Settings, desc: str) -> dict:
  """Implicit DPO rewards beta*(log pi(reply) - log pi_ref(reply)) of the chosen and rejected
  replies, encoded with the run's chat template exactly as training encodes pairs."""
  from lm.data import chat, formats  # pylint: disable=import-outside-toplevel
  from lm.errors import DataError  # pylint: disable=import-outside-toplevel
  records = _records(task, settings)
  encoder = formats.Encoder('preference', model.tokenizer, model.cfg.model.max_seq_len,
                            fields=dict(task.fields), chat_template=model.cfg.data.chat_template,
                            truncate='prompt')
  requests = []
  for i, r in enumerate(records.items):
    try:
      encoder.parse(r, records.where(i))
    except chat.EmptyContent:
      continue  # an empty reply: nothing to compare
    except DataError as e:
      raise UserError(f'{e}; fix the record or `fields` in {task.path}') from None
    encoded, _ = encoder(r)
    if not encoded:
      continue  # a reply longer than the model's context
    for ids, mask in encoded[0]:
      trained = np.flatnonzero(mask)
      requests.append((ids[:trained[0]].tolist(), ids[trained[0]:trained[-1] + 1].tolist()))
  if not requests:
    raise UserError(f'{task.path}: no usable preference pairs in {task.data}')
  policy = np.array([s[0] for s in model.scorer.score(requests, batch_size=settings.batch_size,
                                                      progress=desc)]).reshape(-1, 2)
  reference = _reference_scorer(model)
  beta = task.beta or float(model.cfg.get('dpo', {}).get('beta', 0.1))
  out = {'logp_accuracy': 100.0 * float(np.mean(policy[:, 0] > policy[:, 1])),
         'chosen_logp': float(policy[:, 0].mean()), 'rejected_logp': float(policy[:, 1].mean()),
         'n': len(policy)}
  if reference is None:  # no reference policy (no train.init_from): no implicit reward
    return {**out, 'reference': 'none'}
  ref = np.array([s[0] for s in reference.score(requests, batch_size=settings.batch_size,
                                                progress=desc and desc + ' (reference)')]
                 ).reshape(-1, 2)
  reward = beta * (policy - ref)
  margin = reward[:, 0] - reward[:, 1]
  return {**out, 'reward_accuracy': 100.0 * float(np.mean(margin > 0)),
          'reward_margin': float(margin.mean()), 'chosen_reward': float(reward[:, 0].mean()),
          'rejected_reward': float(reward[:, 1].mean()), 'beta': beta,
          'reference': model.cfg.train.get('init_from', '')}


def _reference_scorer(model):
  """A scorer of the run's reference policy: its `train.init_from` weights (what DPO's frozen copy
  holds, and what a LoRA run's base computes with the adapters off); None without one."""
  if 'reference_scorer' in model.__dict__:
    return model.__dict__['reference_scorer']
  init_from = model.cfg.train.get('init_from', '') if model.run_dir else ''
  scorer = None
  if init_from:
    import jax  # pylint: disable=import-outside-toplevel
    from lm import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    from lm.eval.scoring import Scorer  # pylint: disable=import-outside-toplevel
    from lm.io import pretrained  # pylint: disable=import-outside-toplevel
    shardings = sharding_lib.param_shardings(model.spec.logical_axes, model.spec.shapes, model.mesh,
                                             tuple(model.cfg.mesh.rules))
    base = pretrained.load_params(init_from, model.spec, shardings)
    # Names the base lacks are LoRA adapters: zero adapters are the adapters switched off.
    params = {k: base[k] if k in base else jax.numpy.zeros_like(v) for k, v in model.params.items()}
    scorer = Scorer(model.cfg, params, mesh=model.mesh, spec=model.spec)
  model.__dict__['reference_scorer'] = scorer
  return scorer


# --- GSM8K training text ------------------------------------------------------------------------

def write_gsm8k_train_text(path: str) -> int:
  """The GSM8K training split (the file minus the 500 problems gsm8k.yaml holds out) as
  `{"text": ...}` lines in the prompt format of the gsm8k tasks."""
  import json  # pylint: disable=import-outside-toplevel
  from lm.eval import task_data  # pylint: disable=import-outside-toplevel
  rows = task_data.gsm8k('train')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps({'text': f'Question: {r["question"]}\nAnswer: {r["answer"]}'}) + '\n')
  return len(rows)


def main(argv=None) -> int:
  import sys  # pylint: disable=import-outside-toplevel
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2 or argv[0] != 'gsm8k-train-text':
    print('usage: python -m lm.eval.tasks gsm8k-train-text OUT.jsonl')
    return 2
  n = write_gsm8k_train_text(argv[1])
  print(f'wrote {n} GSM8K training problems (held-out 500 excluded) to {argv[1]}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
