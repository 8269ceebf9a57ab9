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

  def perplexity(self, docs: list[list[int]], *, batch_size: int = 16, progress: str = '') -> dict:
    """Token-level perplexity of documents (ids including BOS), in windows of model.max_seq_len
    or data.seq_len, whichever is shorter; every token after a window's first is predicted."""
    window = min(self.cfg.model.max_seq_len, self.cfg.data.seq_len) + 1
    requests = []
    for ids in docs:
      for start in range(0, max(len(ids) - 1, 1), window - 1):
        chunk = ids[start:start + window]
        if len(chunk) > 1:
          requests.append((chunk[:1], chunk[1:]))
    scores = self.score(requests, batch_size=batch_size, progress=progress)
    logp = sum(s[0] for s in scores)
    tokens = sum(s[1] for s in scores)
    nll = -logp / max(tokens, 1)
    return {'perplexity': perplexity(nll), 'nll': nll, 'tokens': tokens}

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
    for _, options, answer in items:
      s = scores[k:k + len(options)]
      k += len(options)
      right += int(np.argmax([x[0] for x in s]) == answer)
      right_norm += int(np.argmax([x[0] / x[1] for x in s]) == answer)
    n = max(len(items), 1)
    return {'accuracy': 100.0 * right / n, 'accuracy_norm': 100.0 * right_norm / n,
            'chance': 100.0 * float(np.mean([1 / len(o) for _, o, _ in items])) if items else 0.0}
