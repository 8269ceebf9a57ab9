"""Weighted mixing of sources, row by row, deterministic given the seed.

Each global batch of B rows gives source s floor(w_s * B) rows plus, at random in proportion to
the remainders, the rows left over; the sources are then dealt to the rows in a random order.
So every batch holds the mixture to within one row (80/20 on 16 rows is 13 + 3 or 12 + 4), and
the choice depends only on (seed, step): every process computes the same assignment and takes
its own rows, whatever the process count.
"""

from __future__ import annotations

import numpy as np

from lm.errors import ConfigError


class Mixture:

  def __init__(self, names: list[str], weights: list[float], seed: int):
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
      raise ConfigError(f'mixture weights {list(weights)} must be non-negative with a positive sum')
    self.names, self.weights, self.seed = list(names), w / w.sum(), seed

  def __len__(self) -> int:
    return len(self.names)

  def assign(self, step: int, rows: int) -> np.ndarray:
    """Source index of each of the `rows` rows of global batch `step`."""
    if len(self.names) == 1:
      return np.zeros(rows, np.int32)
    rng = np.random.default_rng([self.seed, step, 0x6d6978])
    expected = self.weights * rows
    counts = np.floor(expected).astype(np.int64)
    left = rows - int(counts.sum())
    if left:
      frac = expected - counts
      extra = rng.choice(len(counts), size=left, replace=False, p=frac / frac.sum())
      counts[extra] += 1
    return rng.permutation(np.repeat(np.arange(len(counts), dtype=np.int32), counts))
