"""Metrics on generated text: answer extraction and exact match, token F1, ROUGE-L, BLEU.

Exact match and token F1 follow the SQuAD normalisation (lowercase, no punctuation, no articles,
single spaces), except that a number keeps its value: its sign and decimal point are not
punctuation to strip (SQuAD's rule makes '-18' and '1.8' equal '18'). ROUGE-L is Google's `rouge-score` package and BLEU is `sacrebleu`, so the figures
mean what they mean elsewhere. Each function takes lists of predictions and references and returns
the corpus figure in [0, 100] (BLEU's own scale; the others as percentages).
"""

from __future__ import annotations

import collections
import decimal
import re
import string

_ARTICLES = re.compile(r'\b(a|an|the)\b')
_PUNCTUATION = frozenset(string.punctuation)
_NUMBER = re.compile(r'-?\$?\d[\d,]*(?:\.\d+)?')


# A number standing on its own: a '-' joined to a word before it ('3-4', 'x-1') is a hyphen, not a sign.
_STANDALONE_NUMBER = re.compile(r'(?<!\w)-?\$?\d[\d,]*(?:\.\d+)?|\$?\d[\d,]*(?:\.\d+)?')


def _words(text: str) -> str:
  text = ''.join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  return _ARTICLES.sub(' ', text)


def normalize(text: str) -> str:
  """SQuAD's normalisation (lowercase, no punctuation, no articles, single spaces) of the words,
  with every number kept as its value: stripping punctuation from '-18' or '1.8' would make them
  equal '18', so numbers are normalised by normalize_number instead ('$1,200.00' -> '1200')."""
  parts, end = [], 0
  for found in _STANDALONE_NUMBER.finditer(text):
    parts += [_words(text[end:found.start()]), f' {normalize_number(found.group())} ']
    end = found.end()
  parts.append(_words(text[end:]))
  return ' '.join(''.join(parts).split())


def normalize_number(text: str) -> str:
  """'$1,200.00' -> '1200'; '-3.50' -> '-3.5'; exact for any length (decimal, not float);
  anything not a number is returned stripped."""
  t = text.strip().replace(',', '').replace('$', '').rstrip('.')
  try:
    value = decimal.Decimal(t)
  except decimal.InvalidOperation:
    return text.strip()
  if not value.is_finite():
    return text.strip()
  if value == value.to_integral_value():
    return str(int(value))
  return format(value.normalize(), 'f')


def extract_answer(text: str, marker: str = '####') -> str:
  """The final answer of a worked solution: the number after `marker` (GSM8K's `#### 42`), else
  the last number in the text, else ''. Numbers come back normalised."""
  if marker in text:
    after = text.split(marker, 1)[1]
    found = _NUMBER.search(after)
    if found:
      return normalize_number(found.group())
    return after.strip().split('\n')[0].strip()
  numbers = _NUMBER.findall(text)
  return normalize_number(numbers[-1]) if numbers else ''


def exact_match(predictions: list[str], references: list[str]) -> float:
  """% of predictions equal to their reference after normalisation."""
  _check(predictions, references)
  hits = [normalize(p) == normalize(r) for p, r in zip(predictions, references)]
  return 100.0 * sum(hits) / max(len(hits), 1)


def token_f1(predictions: list[str], references: list[str]) -> float:
  """Mean over examples of the F1 of the normalised bags of words (SQuAD's F1), in %."""
  _check(predictions, references)
  scores = []
  for p, r in zip(predictions, references):
    p_tokens, r_tokens = normalize(p).split(), normalize(r).split()
    if not p_tokens or not r_tokens:
      scores.append(float(p_tokens == r_tokens))
      continue
    common = sum((collections.Counter(p_tokens) & collections.Counter(r_tokens)).values())
    if common == 0:
      scores.append(0.0)
      continue
    precision, recall = common / len(p_tokens), common / len(r_tokens)
    scores.append(2 * precision * recall / (precision + recall))
  return 100.0 * sum(scores) / max(len(scores), 1)


def rouge_l(predictions: list[str], references: list[str]) -> float:
  """Mean ROUGE-L F-measure (longest common subsequence), in %, with Porter stemming."""
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  _check(predictions, references)
  scorer = rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)
  scores = [scorer.score(r, p)['rougeL'].fmeasure for p, r in zip(predictions, references)]
  return 100.0 * sum(scores) / max(len(scores), 1)


def bleu(predictions: list[str], references: list[str]) -> float:
  """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams, brevity penalty)."""
  import sacrebleu  # pylint: disable=import-outside-toplevel
  _check(predictions, references)
  return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def _check(predictions, references):
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions but {len(references)} references')


METRICS = {'exact_match': exact_match, 'token_f1': token_f1, 'rouge_l': rouge_l, 'bleu': bleu}
