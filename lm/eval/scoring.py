"""Log-likelihood scoring on the mesh: perplexity of text, of answers given prompts, and
multiple choice by each option's summed log-probability.

Every request is (context ids, continuation ids); the model scores the continuation given the
context. Requests are right-padded into batches of fixed, bucketed shapes whose rows are sharded
over the data-parallel axes, so one compiled function serves a whole task.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding as sharding_lib
from lm.eval.generate import COMPILED, model_key, progress_bar
from lm.train.metrics import perplexity
from lm.train.state import ModelSpec


def make_score_fn(spec: ModelSpec):
  """fn(params, batch) -> (logprob_sum_B, tokens_B, greedy_B): summed log-probability of the
  weighted targets per row, how many there are, and whether each is the argmax."""

  def score(params, batch):
    logits_BTV = spec.bind(params)(batch['tokens'], batch['positions'], batch['segment_ids'])
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    target_logp_BT = jnp.take_along_axis(logp_BTV, batch['targets'][..., None], axis=-1)[..., 0]
    w_BT = batch['weights']
    greedy_BT = jnp.argmax(logits_BTV, axis=-1) == batch['targets']
    return (jnp.sum(target_logp_BT * w_BT, axis=1), jnp.sum(w_BT, axis=1),
            jnp.all(greedy_BT | (w_BT == 0), axis=1))

  return score


class Scorer:
  """Scores (context, continuation) requests for one model placed on a mesh."""

  def __init__(self, cfg, params: dict, *, mesh, spec: ModelSpec | None = None):
    self.cfg = cfg
    self.spec = spec or ModelSpec(cfg.model)
    rules = tuple(cfg.mesh.rules)
    shardings = sharding_lib.param_shardings(self.spec.logical_axes, self.spec.shapes, mesh, rules)
    self.params = jax.device_put(params, {k: shardings[k] for k in params})
    self.batch_sharding = sharding_lib.batch_sharding(mesh, rules)
    self.dp = sharding_lib.data_parallel_size(mesh, rules)
    key = ('score', model_key(self.spec), mesh, repr(rules), tuple(sorted(params)))
    if key not in COMPILED:
      COMPILED[key] = jax.jit(make_score_fn(self.spec),
                              in_shardings=({k: shardings[k] for k in params}, self.batch_sharding))
    self.fn = COMPILED[key]

  def score(self, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
            bucket: int = 64, progress: str = '') -> list[tuple[float, int, bool]]:
    """(log-probability sum, continuation tokens, greedy) per request. Inputs longer than
    model.max_seq_len lose context from the left; the continuation is always scored whole.
    `progress`: a label for a progress bar with ETA on stderr ('' for none)."""
    max_len = self.cfg.model.max_seq_len
    rows = []
    for context, continuation in requests:
      if not continuation:
        raise ValueError('a scoring request needs at least one continuation token')
      ids = (list(context) + list(continuation))[-(max_len + 1):]
      rows.append((ids, min(len(continuation), len(ids) - 1)))
    B = max(self.dp, -(-min(batch_size, len(rows)) // self.dp) * self.dp)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out: list = [None] * len(rows)
    for start in progress_bar(range(0, len(order), B), progress, unit='batch'):
      idx = order[start:start + B]
      T = min(max(bucket, -(-max(len(rows[i][0]) - 1 for i in idx) // bucket) * bucket), max_len)
      batch = {k: np.zeros((B, T), np.int32) for k in ('tokens', 'targets', 'positions',
                                                        'segment_ids')}
      batch['weights'] = np.zeros((B, T), np.float32)
      for r, i in enumerate(idx):
        ids, n_cont = rows[i]
        n = len(ids) - 1
        batch['tokens'][r, :n], batch['targets'][r, :n] = ids[:-1], ids[1:]
        batch['positions'][r, :n] = np.arange(n)
        batch['segment_ids'][r, :n] = 1
        batch['weights'][r, n - n_cont:n] = 1.0
      logp, count, greedy = jax.device_get(self.fn(self.params, batch))
      for r, i in enumerate(idx):
        out[i] = (float(logp[r]), int(count[r]), bool(greedy[r]))
    return out

  def window(self) -> int:
    """Tokens one perplexity window holds: model.max_seq_len or data.seq_len, the shorter, + 1."""
    return min(self.cfg.model.max_seq_len, self.cfg.data.seq_len) + 1

  def perplexity(self, docs: list[list[int]], *, stride: int = 0, batch_size: int = 16,
                 progress: str = '') -> dict:
    """Token-level perplexity of documents (ids, BOS included where the tokenizer adds one), every
    token after a document's first predicted exactly once. Windows hold `window()` tokens and
    advance by `stride` scored tokens (0: window() - 1, windows that do not overlap, so each
    window's first token is its only context); a smaller stride gives each scored token up to
    window() - stride tokens of earlier context, as Hugging Face's perplexity guide does, at
    window() / stride times the compute. `per_doc` holds each document's (sum log p, tokens)."""
    W = self.window()
    stride = stride or W - 1
    if not 1 <= stride <= W - 1:
      raise ValueError(f'stride={stride} must be in 1..{W - 1} (the window holds {W} tokens)')
    requests, owner = [], []
    for d, ids in enumerate(docs):
      start = 1
      while start < len(ids):
        end = min(start + stride, len(ids))
        requests.append((ids[max(0, end - W):start], ids[start:end]))
        owner.append(d)
        start = end
    scores = self.score(requests, batch_size=batch_size, progress=progress)
    per_doc = [[0.0, 0] for _ in docs]
    for d, (logp, n, _) in zip(owner, scores):
      per_doc[d][0] += logp
      per_doc[d][1] += n
    logp = sum(s[0] for s in scores)
    tokens = sum(s[1] for s in scores)
    nll = -logp / max(tokens, 1)
    return {'perplexity': perplexity(nll), 'nll': nll, 'tokens': tokens,
            'per_doc': [tuple(p) for p in per_doc]}

  def perplexity_of_rows(self, rows: dict, *, batch_size: int = 16) -> dict:
    """Perplexity of packed rows (lm/data/packing.py: tokens, targets, weights, positions,
    segment_ids), as the training loop's held-out evaluation computes it."""
    n = len(rows['tokens'])
    B = max(self.dp, -(-min(batch_size, n) // self.dp) * self.dp)
    logp = tokens = 0.0
    for start in range(0, n, B):
      idx = np.arange(start, start + B)
      batch = {k: np.asarray(v)[np.minimum(idx, n - 1)] for k, v in rows.items()}
      batch['weights'] = batch['weights'] * (idx < n)[:, None]  # the last batch's filler rows
      lp, count, _ = jax.device_get(self.fn(self.params, batch))
      logp, tokens = logp + float(lp.sum()), tokens + float(count.sum())
    nll = -logp / max(tokens, 1.0)
    return {'perplexity': perplexity(nll), 'nll': nll, 'tokens': int(tokens)}

  def multiple_choice(self, items: list[tuple[list[int], list[list[int]], int]], *,
                      batch_size: int = 16, progress: str = '') -> dict:
    """items: (context ids, option ids, index of the right option). An item counts as right when
    its right option has the highest summed log-probability (`accuracy`) or the highest mean per
    token (`accuracy_norm`, which does not favour short options)."""
    requests = [(ctx, opt) for ctx, options, _ in items for opt in options]
    scores = self.score(requests, batch_size=batch_size, progress=progress)
    right = right_norm = 0
    k = 0
    per_item = []
    for _, options, answer in items:
      s = scores[k:k + len(options)]
      k += len(options)
      pick, pick_norm = int(np.argmax([x[0] for x in s])), int(np.argmax([x[0] / x[1] for x in s]))
      right += int(pick == answer)
      right_norm += int(pick_norm == answer)
      per_item.append({'logp': [x[0] for x in s], 'tokens': [x[1] for x in s], 'label': answer,
                       'pick': pick, 'pick_norm': pick_norm, 'correct': pick == answer})
    n = max(len(items), 1)
    return {'accuracy': 100.0 * right / n, 'accuracy_norm': 100.0 * right_norm / n,
            'chance': 100.0 * float(np.mean([1 / len(o) for _, o, _ in items])) if items else 0.0,
            'per_item': per_item}
