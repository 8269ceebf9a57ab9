"""The shared data folder (task files' `shared:PATH`), GSM8K's held-out split, and the examples of
the built-in tasks that are made rather than read: multiple-choice items whose wrong options are
drawn from other examples. Task files name those as `data: python:MODULE:FN`; each function takes
the evaluation Settings and returns records."""

from __future__ import annotations

import json
import os
import re

import numpy as np

from lm.eval import text_metrics as tm
from lm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

GSM8K_HELDOUT = 500  # the last 500 problems of GSM8K's train.jsonl: never fine-tuned on


def shared_data(*parts: str) -> str:
  """A file under the shared data folder ($LM_SHARED_DATA, default ../shared/data from the repo)."""
  root = os.environ.get('LM_SHARED_DATA', os.path.join(ROOT, '..', 'shared', 'data'))
  path = os.path.join(root, *parts)
  if not os.path.isfile(path):
    raise UserError(f'{path} not found; set LM_SHARED_DATA to the shared data folder')
  return path


def _clean(answer: str) -> str:
  return re.sub(r'<<[^>]*>>', '', answer)  # GSM8K's calculator notes, <<48/2=24>>


def gsm8k(split: str) -> list[dict]:
  with open(shared_data('gsm8k', 'train.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [{'question': r['question'], 'answer': _clean(r['answer'])} for r in rows]
  return rows[:-GSM8K_HELDOUT] if split == 'train' else rows[-GSM8K_HELDOUT:]


def gsm8k_choice(settings) -> list[dict]:
  """The reference solution up to `####`, then the right answer or one of three other held-out
  problems' answers, in a seeded order."""
  rows = gsm8k('eval')
  pool = [tm.extract_answer(r['answer']) for r in rows]
  rng = np.random.default_rng(settings.seed)
  out = []
  for r in rows[:settings.limit or None]:
    solution, gold = r['answer'].rsplit('####', 1)
    gold = tm.normalize_number(gold)
    distractors = [a for a in dict.fromkeys(rng.permutation(pool).tolist()) if a != gold][:3]
    options = [gold] + distractors
    order = rng.permutation(len(options))
    out.append({'context': f'Question: {r["question"]}\nAnswer: {solution}####',
                'choices': [options[i] for i in order], 'label': int(np.argmin(order))})
  return out


def _sentences(text: str) -> list[str]:
  return [s for s in re.split(r'(?<=[.!?])\s+', text) if 40 <= len(s) <= 300]


def wiki_cloze(settings) -> list[dict]:
  """Two sentences of a Wikipedia article; options: its next sentence and three from other
  articles."""
  with open(shared_data('wiki-demo', 'wiki_demo.txt'), encoding='utf-8') as f:
    articles = [line.strip() for line in f if line.strip()]
  rng = np.random.default_rng(settings.seed)
  per_article = [_sentences(a) for a in articles]
  out = []
  n = settings.limit or 200
  while len(out) < n:
    a = int(rng.integers(len(per_article)))
    sents = per_article[a]
    if len(sents) < 4:
      continue
    i = int(rng.integers(len(sents) - 2))
    others = [b for b in range(len(per_article)) if b != a and per_article[b]]
    distractors = [per_article[b][int(rng.integers(len(per_article[b])))]
                   for b in rng.choice(others, 3, replace=False)]
    options = [sents[i + 2]] + distractors
    order = rng.permutation(4)
    out.append({'context': ' '.join(sents[i:i + 2]), 'choices': [options[j] for j in order],
                'label': int(np.argmin(order))})
  return out
