"""`lm data show`: what the model is trained on, as rendered examples with their loss mask.

Text the loss ignores (prompts, padding, a document's first token) is printed inside ⟦ ⟧, or
dimmed on a terminal; special tokens print as their own names (<s>, <|im_end|>).
"""

from __future__ import annotations

import sys
import tempfile

import numpy as np

from lm.data import packing, pipeline

OPEN, CLOSE = '⟦', '⟧'


def _is_special(tokenizer, i: int) -> bool:
  return i in (tokenizer.bos_id, tokenizer.eos_id) or tokenizer.is_special(i)


def render(tokenizer, ids, trained, *, color: bool = False) -> str:
  """Token ids with per-token trained flags -> text, untrained runs marked."""
  out, start = [], 0
  ids = [int(i) for i in ids]

  def text_of(a, b):
    # Decode with the preceding tokens so word-initial spaces survive.
    head = tokenizer.decode(ids[max(0, a - 8):a]) if a else ''
    full = tokenizer.decode(ids[max(0, a - 8):b])
    return full[len(head):] if full.startswith(head) else tokenizer.decode(ids[a:b])

  pieces = []  # (text, trained)
  while start < len(ids):
    end = start
    if _is_special(tokenizer, ids[start]):
      pieces.append((tokenizer.token_string(ids[start]), trained[start]))
      start += 1
      continue
    while end < len(ids) and trained[end] == trained[start] and not _is_special(tokenizer, ids[end]):
      end += 1
    pieces.append((text_of(start, end), trained[start]))
    start = end
  for text, is_trained in pieces:
    if is_trained:
      out.append(text)
    elif color:
      out.append(f'\033[2m{text}\033[0m')
    else:
      out.append(f'{OPEN}{text}{CLOSE}')
  merged = ''.join(out)
  return merged if color else merged.replace(CLOSE + OPEN, '')


def segments(rows: dict, prefix: str = ''):
  """(row, ids, trained) per packed segment: its tokens and which of them are trained targets."""
  seg_BT = rows[prefix + 'segment_ids']
  for r in range(seg_BT.shape[0]):
    for s in np.unique(seg_BT[r][seg_BT[r] > 0]):
      where = np.flatnonzero(seg_BT[r] == s)
      ids = np.concatenate([rows[prefix + 'tokens'][r, where[:1]], rows[prefix + 'targets'][r, where]])
      trained = np.concatenate([[False], rows[prefix + 'weights'][r, where] > 0])
      after = where[-1] + 1
      if (after < seg_BT.shape[1] and seg_BT[r, after] != 0
          and rows[prefix + 'tokens'][r, after] == ids[-1] and not trained[-1]):
        ids, trained = ids[:-1], trained[:-1]  # stream packing: that target opens the next segment
      yield r, ids, trained


def show(cfg, *, workdir: str | None = None, examples: int = 3, batches: int = 8, file=None) -> dict:
  """Prints `examples` rendered training examples and packing figures; returns the figures."""
  file = file or sys.stdout
  color = file.isatty() if hasattr(file, 'isatty') else False
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer = pipeline.load_tokenizer(cfg.data, workdir or tmp)
    corpus = pipeline.build_corpus(cfg.data, tokenizer)
  print(corpus.describe(), file=file)
  it = pipeline.BatchIterator(corpus.train, cfg.data.batch_size, cfg.data.seed, prefetch=0)
  first = next(it)
  got = [first] + [next(it) for _ in range(batches - 1)]
  pairs = corpus.train.pairs
  prefix = 'chosen_' if pairs else ''
  stacked = {k: np.concatenate([b[k] for b in got]) for k in got[0]}
  efficiency = packing.packing_efficiency(stacked)
  trained = float(np.mean(stacked[prefix + 'weights'] > 0))
  figures = {'packing_efficiency': efficiency, 'trained_fraction': trained, **it.metrics()}
  it.close()
  legend = 'dimmed' if color else f'inside {OPEN} {CLOSE}'
  print(f'first {batches} batches of {cfg.data.batch_size} x {cfg.data.seq_len}: packing efficiency '
        f'{efficiency:.1%}, trained positions {trained:.1%}; '
        + ', '.join(f'{k.removeprefix("data/")} {v:,.0f}' for k, v in figures.items()
                    if k.startswith('data/')), file=file)
  print(f'text the loss ignores is {legend}\n', file=file)
  shown = 0
  for r, ids, mask in segments(first, prefix):
    if shown >= examples:
      break
    n_trained = int(mask.sum())
    print(f'--- row {r}, {len(ids)} tokens, {n_trained} trained'
          + (' (chosen)' if pairs else ''), file=file)
    print(render(tokenizer, ids, mask, color=color), file=file)
    if pairs:
      for r2, ids2, mask2 in segments({k: v[r:r + 1] for k, v in first.items()}, 'rejected_'):
        del r2
        print(f'--- rejected, {len(ids2)} tokens, {int(mask2.sum())} trained', file=file)
        print(render(tokenizer, ids2, mask2, color=color), file=file)
        break
    print(file=file)
    shown += 1
  return figures
