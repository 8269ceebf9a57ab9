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
runs through `lm eval --harness` (lm/eval/harness.py). The format is parsed in lm/eval/task_file.py;
docs/evaluation.md is the reference.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import numpy as np

from lm import sharding as sharding_lib
from lm.data import chat, formats, pipeline
from lm.eval import text_metrics as tm
from lm.eval.task_file import (Records, Task, builtin_tasks, choices_of, label_index,
                               labels_from_file, limit_of, load_records, load_task, parse_tasks,
                               render, render_text, resolve)
from lm.errors import DataError, UserError
from lm.eval import task_data
from lm.eval.generate import Sampling
from lm.eval.scoring import Scorer
from lm.io import pretrained, runs
from lm.train.metrics import perplexity

__all__ = ['Settings', 'Task', 'builtin_tasks', 'load_task', 'parse_tasks', 'resolve', 'run',
           'lower_is_better']
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
  stride: int = 0  # perplexity: tokens scored per window (0: the window less one; a task's own wins)

  def __post_init__(self):
    for key, least in (('limit', 0), ('shots', 0), ('max_new_tokens', 1), ('top_k', 0),
                       ('batch_size', 1), ('seed', 0), ('stride', 0)):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise UserError(f'{key}={value!r}: give a whole number >= {least}'
                        + (' (0: every example)' if key == 'limit' else ''))
    for key in ('temperature', 'top_p'):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f'{key}={value!r}: give a finite number')


def lower_is_better(metric: str) -> bool:
  return any(s in metric for s in ('loss', 'perplexity', 'nll', 'bits_per_byte'))


# --- running ------------------------------------------------------------------------------------

def _split_encode(tokenizer, context: str, continuation: str):
  """(context ids, continuation ids) such that together they encode context+continuation; the
  context starts with BOS where the tokenizer's own settings add one (tokenizer.add_bos)."""
  ctx = tokenizer.encode(context, bos=tokenizer.add_bos)
  full = tokenizer.encode(context + continuation, bos=tokenizer.add_bos)
  if full[:len(ctx)] == ctx and len(full) > len(ctx):
    return ctx, full[len(ctx):]
  return ctx, tokenizer.encode(continuation)


def _shots_prefix(task: Task, settings: Settings, answer) -> str:
  """k solved exemplars, each prompt + delimiter + its answer, then the few-shot delimiter."""
  shots = settings.shots or task.shots
  if not shots or not task.fewshot:  # a task without exemplars runs zero-shot
    return ''
  records = load_records(task, task.fewshot, task.fewshot_rows, settings)
  if shots > len(records):  # fewer exemplars than asked would change what the score means
    raise UserError(f'task file {task.path}: {shots} shots asked for but the fewshot data '
                    f'{task.fewshot} holds {len(records)} records; lower shots or add exemplars')
  out = []
  for i in range(shots):
    where = records.where(i)
    out.append(render_text(task, 'prompt', records.items[i], where) + task.target_delimiter
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


def _records(task: Task, settings: Settings) -> tuple[Records, dict]:
  """The records to score, and {'available': N} when a limit leaves some out, so a result says
  it covers part of the file (`lm eval` prints it; results.json keeps it)."""
  records = load_records(task, task.data, task.rows, settings)
  n = limit_of(task, settings)
  if n and task.limit_by == 'records' and n < len(records):
    return Records(records.items[:n], records.where), {'available': len(records)}
  return records, {}


def _perplexity(task: Task, model, settings: Settings, desc: str) -> dict:
  if task.data == HELDOUT:
    return _heldout(model, settings, desc)
  records, part = _records(task, settings)
  if task.prompt:  # the target given the prompt
    prefix = _shots_prefix(task, settings, lambda r, w: render_text(task, 'target', r, w))
    requests, chars = [], 0
    for i, r in enumerate(records.items):
      where = records.where(i)
      target = task.target_delimiter + render_text(task, 'target', r, where)
      requests.append(_split_encode(model.tokenizer, prefix + render_text(task, 'prompt', r, where), target))
      chars += len(target.encode('utf-8'))
    scores = model.scorer.score(requests, batch_size=settings.batch_size, progress=desc)
    logp, tokens = sum(s[0] for s in scores), sum(s[1] for s in scores)
    nll = -logp / max(tokens, 1)
    items = [{'where': records.where(i), 'logp': s[0], 'tokens': s[1], 'greedy': s[2]}
             for i, s in enumerate(scores)]
    return {'answer_perplexity': perplexity(nll), 'answer_nll': nll,
            'answer_bits_per_byte': -logp / math.log(2) / max(chars, 1), 'n': len(requests),
            **part, 'items': items}
  texts = [render_text(task, 'text', r, records.where(i)) for i, r in enumerate(records.items)]
  docs = [model.tokenizer.encode(t, bos=model.tokenizer.add_bos, eos=True) for t in texts]
  n = limit_of(task, settings)
  if n and task.limit_by == 'windows':  # the first `n` windows' worth of tokens, over all texts
    per = max(1, n * model.cfg.data.seq_len // max(len(docs), 1))
    docs = [d[:per + 1] for d in docs]
    texts = [model.tokenizer.decode([i for i in d if i not in (model.tokenizer.bos_id,
                                                               model.tokenizer.eos_id)])
             for d in docs]
  stride = task.stride or settings.stride
  try:
    out = model.scorer.perplexity(docs, stride=stride, batch_size=settings.batch_size, progress=desc)
  except ValueError as e:  # a stride longer than the model's window
    raise UserError(f'task {task.name}: {e}; set `stride` (or --config.stride) within it') from None
  items = [{'where': records.where(i), 'logp': lp, 'tokens': n}
           for i, (lp, n) in enumerate(out.pop('per_doc'))]
  out['stride'] = stride or model.scorer.window() - 1
  total = out['nll'] * out['tokens']
  words = sum(len(t.split()) for t in texts)
  chars = sum(len(t.encode('utf-8')) for t in texts)
  return {**out, 'word_perplexity': perplexity(total / max(words, 1)),
          'bits_per_byte': total / math.log(2) / max(chars, 1), 'words': words, 'bytes': chars,
          'n': len(docs), **part, 'items': items}


def _heldout(model, settings: Settings, desc: str) -> dict:
  data_cfg = runs.load_config(settings.heldout_from).data if settings.heldout_from else model.cfg.data
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
  records, part = _records(task, settings)
  prefix = _shots_prefix(task, settings, lambda r, w: render_text(task, 'target', r, w))
  prompts = [render_text(task, 'prompt', r, records.where(i)) for i, r in enumerate(records.items)]
  refs = [render_text(task, 'target', r, records.where(i)) for i, r in enumerate(records.items)]
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
  out.update(part)
  items = [{'where': records.where(i), 'prompt': p, 'output': o, 'answer': a, 'gold': g,
            'correct': tm.exact_match([a], [g]) == 100.0}
           for i, (p, o, a, g) in enumerate(zip(prompts, outs, answers, gold))]
  out['examples'] = [{k: v for k, v in item.items() if k in ('prompt', 'output', 'answer', 'gold')}
                     for item in items[:3]]
  out['items'] = items
  return out


def _choice(task: Task, model, settings: Settings, desc: str) -> dict:
  records, part = _records(task, settings)
  labels, label_where = None, None
  if task.label_file:
    labels, label_where = labels_from_file(task, settings)

  def answer(record, where):  # an exemplar's right choice
    options = choices_of(task, record, where)
    return options[label_index(render(task, 'label', task.label, record, where), options, where,
                          f'fix the record or `label` in {task.path}')]

  prefix = _shots_prefix(task, settings, answer)
  items = []
  for i, r in enumerate(records.items):
    where = records.where(i)
    options = choices_of(task, r, where)
    if labels is not None:
      right = label_index(labels[i], options, f'{label_where(i)} (for {where})',
                     'give a choice index (0-based) or the text of a choice')
    else:
      right = label_index(render(task, 'label', task.label, r, where), options, where,
                     f'fix the record, or `label` in {task.path}')
    context = prefix + render_text(task, 'prompt', r, where)
    ctx = model.tokenizer.encode(context, bos=model.tokenizer.add_bos)
    opts = [_split_encode(model.tokenizer, context, task.target_delimiter + o)[1] for o in options]
    items.append((ctx, opts, right))
  out = model.scorer.multiple_choice(items, batch_size=settings.batch_size, progress=desc)
  per_item = [{'where': records.where(i), **item} for i, item in enumerate(out.pop('per_item'))]
  return {**out, 'n': len(items), **part, 'items': per_item}


def _preference(task: Task, model, settings: Settings, desc: str) -> dict:
  """Implicit DPO rewards beta*(log pi(reply) - log pi_ref(reply)) of the chosen and rejected
  replies, encoded with the run's chat template exactly as training encodes pairs."""
  records, part = _records(task, settings)
  encoder = formats.Encoder('preference', model.tokenizer, model.cfg.model.max_seq_len,
                            fields=dict(task.fields), chat_template=model.cfg.data.chat_template,
                            truncate='prompt')
  requests, used = [], []
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
    used.append(records.where(i))
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
         'n': len(policy), **part}
  items = [{'where': w, 'chosen_logp': float(c), 'rejected_logp': float(r)}
           for w, (c, r) in zip(used, policy)]
  if reference is None:  # no reference policy (no train.init_from): no implicit reward
    return {**out, 'reference': 'none', 'items': items}
  ref = np.array([s[0] for s in reference.score(requests, batch_size=settings.batch_size,
                                                progress=desc and desc + ' (reference)')]
                 ).reshape(-1, 2)
  reward = beta * (policy - ref)
  margin = reward[:, 0] - reward[:, 1]
  for item, (c, r), m in zip(items, ref, margin):
    item.update(ref_chosen_logp=float(c), ref_rejected_logp=float(r), reward_margin=float(m))
  return {**out, 'items': items, 'reward_accuracy': 100.0 * float(np.mean(margin > 0)),
          'reward_margin': float(margin.mean()), 'chosen_reward': float(reward[:, 0].mean()),
          'rejected_reward': float(reward[:, 1].mean()), 'beta': beta,
          'reference': model.cfg.train.get('init_from', '')}


def _reference_scorer(model):
  """A scorer of the run's reference policy: its `train.init_from` weights (what DPO's frozen copy
  holds, and what a LoRA run's base computes with the adapters off); None without one."""
  if 'reference_scorer' in model.__dict__:
    return model.__dict__['reference_scorer']
  # A Hugging Face directory or GGUF file is its own init_from: it has no reference of its own.
  trained = model.run_dir and not runs.is_hf_directory(model.run_dir)
  init_from = model.cfg.train.get('init_from', '') if trained else ''
  scorer = None
  if init_from:
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
