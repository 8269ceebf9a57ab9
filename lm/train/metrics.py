"""Where metrics go (metrics.jsonl in the workdir, and the experiment trackers), how they are read
back, perplexity from a mean NLL, and the loss-curve plot that `lm compare` and sweeps draw."""

from __future__ import annotations

import json
import math
import os

from lm.train import rundir, trackers

# exp(50) ~ 5e21: a diverged run reports a huge perplexity instead of overflowing.
MAX_NLL_FOR_PERPLEXITY = 50.0


def perplexity(mean_nll: float) -> float:
  return math.exp(min(mean_nll, MAX_NLL_FOR_PERPLEXITY))


class MetricWriter:
  """The one place metrics go: metrics.jsonl, and the trackers `train.trackers` names
  (lm/train/trackers.py), which also get `cfg` (the resolved config) and the final summary."""

  def __init__(self, workdir: str, cfg, *, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    # `inside`: a metrics.jsonl or tensorboard/ symlinked out of the run is refused, not followed.
    self.jsonl = open(rundir.inside(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    try:
      self.trackers = trackers.Trackers(workdir, cfg, trackers.names(cfg))
    except BaseException:
      self.jsonl.close()
      raise

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self.jsonl.flush()
    self.trackers.log(int(step), scalars)

  def flush(self) -> None:
    if self.enabled:
      self.trackers.flush()

  def close(self, summary: dict | None = None, *, failed: bool = False) -> None:
    """Ends the trackers' runs, with the run's final summary when it has one. Once."""
    if not self.enabled or self.jsonl.closed:
      return
    self.jsonl.close()
    self.trackers.finish(summary or {}, failed)


def read_metrics(workdir: str) -> list[dict]:
  """The records of `workdir/metrics.jsonl`; none when there is no file yet. A torn last line (a
  run killed mid-write) and lines that are not JSON objects are skipped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  records = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def plot_loss_curves(records: dict, path: str, *, title: str = '', ylabel: str = 'loss') -> str:
  """Training loss (and held-out loss, when any run logged it) against step, one line per run.
  `records`: {run name: metrics records}. Writes a PNG to `path` and returns it."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  has_eval = any('eval_loss' in r for recs in records.values() for r in recs)
  panels = [('loss', 'training loss')] + ([('eval_loss', 'held-out loss')] if has_eval else [])
  fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
  for ax, (key, label) in zip(axes[0], panels):
    for name, recs in records.items():
      points = [(r['step'], r[key]) for r in recs if _finite(r.get(key)) and _finite(r.get('step'))]
      if points:
        ax.plot(*zip(*points), marker='o' if key == 'eval_loss' else None, markersize=3, label=name)
    ax.set_xlabel('step')
    ax.set_ylabel(ylabel)
    ax.set_title(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_rewards(records: list[dict], path: str, *, title: str = '') -> str:
  """A GRPO run's learning curve: each round's mean training reward and the held-out reward
  (`grpo.eval_every`) against the optimizer step. Writes a PNG to `path` and returns it."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.5, 4))
  for key, label, style in (('reward_mean', 'training reward (round mean)', dict(alpha=0.45)),
                            ('heldout_reward', 'held-out reward', dict(marker='o', markersize=4))):
    points = [(r['step'], r[key]) for r in records if _finite(r.get(key)) and _finite(r.get('step'))]
    if points:
      ax.plot(*zip(*points), label=label, **style)
  ax.set_xlabel('optimizer step')
  ax.set_ylabel('reward')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


if __name__ == '__main__':
  # python -m lm.train.metrics RUN OUT.png [TITLE]: a GRPO run's reward curve (docs/posttraining.md).
  import sys  # pylint: disable=import-outside-toplevel
  run, out, *rest = sys.argv[1:]
  print(plot_rewards(read_metrics(run), out, title=' '.join(rest)))
