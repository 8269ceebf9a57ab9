"""Evaluation tasks on the shared data: each maps (model, settings) -> {metric: value}.

  gsm8k         generate a solution; exact match of the extracted `#### N`, and token F1,
                ROUGE-L and BLEU of the solution text against the reference
  gsm8k_nll     perplexity of the reference solution given the question (sensitive long before
                a small model gets answers right)
  gsm8k_choice  multiple choice: the reference solution ending in the right `#### N` or in one
                of three other problems' answers
  alpaca        generate a response to a held-out instruction; ROUGE-L, BLEU, token F1
  wiki_ppl      perplexity of Wikipedia articles (general text: forgetting)
  wiki_cloze    multiple choice: the true next sentence of a Wikipedia passage among four
  heldout_ppl   perplexity of a run's own held-out split (`settings.heldout_from`, default the
                model's run): the pretraining text, for forgetting

GSM8K's file has 7,473 problems; the last 500 are this library's held-out split and are never
written to fine-tuning text (`python -m lm.eval.tasks gsm8k-train-text OUT.jsonl`); few-shot
exemplars come from the training split. Prompts are `Question: ...\nAnswer: ...`, the format the
fine-tuning text uses. Answers carry GSM8K's `<<48/2=24>>` calculator notes removed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import numpy as np

from lm.data import pipeline
from lm.eval import text_metrics as tm
from lm.errors import UserError
from lm.eval.generate import Sampling
from lm.io.runs import load_config
from lm.train.metrics import perplexity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
GSM8K_HELDOUT = 500
ALPACA_HELDOUT = 500


def shared_data(*parts: str) -> str:
  """A file under the shared data folder ($LM_SHARED_DATA, default ../shared/data from the repo)."""
  root = os.environ.get('LM_SHARED_DATA', os.path.join(ROOT, '..', 'shared', 'data'))
  path = os.path.join(root, *parts)
  if not os.path.isfile(path):
    raise UserError(f'{path} not found; set LM_SHARED_DATA to the shared data folder')
  return path


@dataclasses.dataclass(frozen=True)
class Settings:
  limit: int = 100  # examples per task (0: all of the held-out split)
  shots: int = 0  # solved exemplars before each prompt (gsm8k, gsm8k_nll, alpaca)
  max_new_tokens: int = 160
  temperature: float = 0.0  # 0: greedy
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 16
  seed: int = 0
  heldout_from: str = ''  # heldout_ppl: whose held-out split ('' = the model's own run)


# --- data ---------------------------------------------------------------------------------------

def _clean(answer: str) -> str:
  return re.sub(r'<<[^>]*>>', '', answer)


def gsm8k(split: str) -> list[dict]:
  with open(shared_data('gsm8k', 'train.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [{'question': r['question'], 'answer': _clean(r['answer'])} for r in rows]
  return rows[:-GSM8K_HELDOUT] if split == 'train' else rows[-GSM8K_HELDOUT:]


def gsm8k_text(row: dict) -> str:
  return f'Question: {row["question"]}\nAnswer: {row["answer"]}'


def gsm8k_prompt(row: dict, exemplars: list[dict]) -> str:
  shots = ''.join(gsm8k_text(e) + '\n\n' for e in exemplars)
  return f'{shots}Question: {row["question"]}\nAnswer:'


def alpaca(split: str) -> list[dict]:
  with open(shared_data('alpaca5k', 'alpaca_5000.json'), encoding='utf-8') as f:
    rows = json.load(f)
  return rows[:-ALPACA_HELDOUT] if split == 'train' else rows[-ALPACA_HELDOUT:]


def alpaca_prompt(row: dict, exemplars: list[dict]) -> str:
  def one(r):
    extra = f'\nInput: {r["input"]}' if r.get('input') else ''
    return f'Instruction: {r["instruction"]}{extra}\nResponse:'
  shots = ''.join(f'{one(e)} {e["output"]}\n\n' for e in exemplars)
  return shots + one(row)


def wiki_articles() -> list[str]:
  with open(shared_data('wiki-demo', 'wiki_demo.txt'), encoding='utf-8') as f:
    return [line.strip() for line in f if line.strip()]


def _limit(rows, settings):
  return rows[:settings.limit] if settings.limit else rows


def _split_encode(tokenizer, context: str, continuation: str):
  """(context ids with BOS, continuation ids) such that together they encode context+continuation."""
  ctx = tokenizer.encode(context, bos=True)
  full = tokenizer.encode(context + continuation, bos=True)
  if full[:len(ctx)] == ctx and len(full) > len(ctx):
    return ctx, full[len(ctx):]
  return ctx, tokenizer.encode(continuation)


# --- tasks --------------------------------------------------------------------------------------

def _generate(model, prompts, settings, stop):
  sampling = Sampling(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                      top_k=settings.top_k, top_p=settings.top_p)
  return model.generator.generate(prompts, sampling, stop=stop, seed=settings.seed,
                                  batch_size=settings.batch_size)


def task_gsm8k(model, settings: Settings) -> dict:
  rows = _limit(gsm8k('eval'), settings)
  exemplars = gsm8k('train')[:settings.shots]
  outs = _generate(model, [gsm8k_prompt(r, exemplars) for r in rows], settings, ['Question:'])
  refs = [r['answer'] for r in rows]
  answers = [tm.extract_answer(o) for o in outs]
  gold = [tm.extract_answer(r) for r in refs]
  return {'exact_match': tm.exact_match(answers, gold), 'token_f1': tm.token_f1(outs, refs),
          'rouge_l': tm.rouge_l(outs, refs), 'bleu': tm.bleu(outs, refs),
          'answered': 100.0 * np.mean([a != '' for a in answers]), 'n': len(rows),
          'examples': [{'prompt': r['question'], 'output': o, 'answer': a, 'gold': g}
                       for r, o, a, g in list(zip(rows, outs, answers, gold))[:3]]}


def task_gsm8k_nll(model, settings: Settings) -> dict:
  rows = _limit(gsm8k('eval'), settings)
  exemplars = gsm8k('train')[:settings.shots]
  requests = [_split_encode(model.tokenizer, gsm8k_prompt(r, exemplars), ' ' + r['answer'])
              for r in rows]
  scores = model.scorer.score(requests, batch_size=settings.batch_size)
  logp, tokens = sum(s[0] for s in scores), sum(s[1] for s in scores)
  nll = -logp / max(tokens, 1)
  return {'answer_perplexity': perplexity(nll), 'answer_nll': nll, 'n': len(rows)}


def task_gsm8k_choice(model, settings: Settings) -> dict:
  rows = _limit(gsm8k('eval'), settings)
  pool = [tm.extract_answer(r['answer']) for r in gsm8k('eval')]
  rng = np.random.default_rng(settings.seed)
  items = []
  for r in rows:
    solution, gold = r['answer'].rsplit('####', 1)
    gold = tm.normalize_number(gold)
    distractors = [a for a in dict.fromkeys(rng.permutation(pool).tolist()) if a != gold][:3]
    options = [gold] + distractors
    order = rng.permutation(len(options))
    prefix = gsm8k_prompt(r, []) + ' ' + solution + '####'
    ctx = model.tokenizer.encode(prefix, bos=True)
    opts = [_split_encode(model.tokenizer, prefix, ' ' + options[i])[1] for i in order]
    items.append((ctx, opts, int(np.argmin(order))))
  return {**model.scorer.multiple_choice(items, batch_size=settings.batch_size), 'n': len(items)}


def task_alpaca(model, settings: Settings) -> dict:
  rows = _limit(alpaca('eval'), settings)
  exemplars = alpaca('train')[:settings.shots]
  outs = _generate(model, [alpaca_prompt(r, exemplars) for r in rows], settings, ['Instruction:'])
  refs = [r['output'] for r in rows]
  return {'rouge_l': tm.rouge_l(outs, refs), 'bleu': tm.bleu(outs, refs),
          'token_f1': tm.token_f1(outs, refs), 'n': len(rows)}


def task_wiki_ppl(model, settings: Settings) -> dict:
  articles = wiki_articles()
  docs = [model.tokenizer.encode(a, bos=True, eos=True) for a in articles]
  if settings.limit:  # the first `limit` windows' worth of tokens, spread over all articles
    per = max(1, settings.limit * model.cfg.data.seq_len // len(docs))
    docs = [d[:per + 1] for d in docs]
  return model.scorer.perplexity(docs, batch_size=settings.batch_size)


def _sentences(text: str) -> list[str]:
  return [s for s in re.split(r'(?<=[.!?])\s+', text) if 40 <= len(s) <= 300]


def task_wiki_cloze(model, settings: Settings) -> dict:
  """Passage of two sentences; options: its next sentence and three from other articles."""
  rng = np.random.default_rng(settings.seed)
  per_article = [_sentences(a) for a in wiki_articles()]
  items = []
  n = settings.limit or 200
  while len(items) < n:
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
    context = ' '.join(sents[i:i + 2])
    ctx = model.tokenizer.encode(context, bos=True)
    opts = [_split_encode(model.tokenizer, context, ' ' + options[j])[1] for j in order]
    items.append((ctx, opts, int(np.argmin(order))))
  return {**model.scorer.multiple_choice(items, batch_size=settings.batch_size), 'n': len(items)}


def task_heldout_ppl(model, settings: Settings) -> dict:
  data_cfg = load_config(settings.heldout_from).data if settings.heldout_from else model.cfg.data
  rows = pipeline.build_corpus(data_cfg, model.tokenizer).eval
  if settings.limit:
    rows = {k: v[:settings.limit] for k, v in rows.items()}
  return model.scorer.perplexity_of_rows(rows, batch_size=settings.batch_size)


TASKS = {
    'gsm8k': task_gsm8k,
    'gsm8k_nll': task_gsm8k_nll,
    'gsm8k_choice': task_gsm8k_choice,
    'alpaca': task_alpaca,
    'wiki_ppl': task_wiki_ppl,
    'wiki_cloze': task_wiki_cloze,
    'heldout_ppl': task_heldout_ppl,
}

# The figure each task is ranked by in tables and plots, and whether higher is better.
HEADLINE = {
    'gsm8k': ('exact_match', True), 'gsm8k_nll': ('answer_perplexity', False),
    'gsm8k_choice': ('accuracy', True), 'alpaca': ('rouge_l', True),
    'wiki_ppl': ('perplexity', False), 'wiki_cloze': ('accuracy', True),
    'heldout_ppl': ('perplexity', False),
}


def parse_tasks(spec: str) -> list[str]:
  names = [t.strip() for t in spec.split(',') if t.strip()]
  unknown = [t for t in names if t not in TASKS]
  if unknown or not names:
    raise UserError(f'unknown task(s) {unknown or spec!r}; choose from {sorted(TASKS)}')
  return names


def write_gsm8k_train_text(path: str) -> int:
  """The GSM8K training split as `{"text": ...}` lines in the prompt format of the tasks."""
  rows = gsm8k('train')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    for r in rows:
      f.write(json.dumps({'text': gsm8k_text(r)}) + '\n')
  return len(rows)


def main(argv=None) -> int:
  import sys  # pylint: disable=import-outside-toplevel
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2 or argv[0] != 'gsm8k-train-text':
    print('usage: python -m lm.eval.tasks gsm8k-train-text OUT.jsonl')
    return 2
  n = write_gsm8k_train_text(argv[1])
  print(f'wrote {n} GSM8K training problems (held-out {GSM8K_HELDOUT} excluded) to {argv[1]}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
