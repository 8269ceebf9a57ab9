"""Where metrics go: metrics.jsonl and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import os


class MetricWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self.tb = None
    if tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({'step': int(step), **scalars}) + '\n')
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, v, step)

  def flush(self) -> None:
    if self.enabled and self.tb is not None:
      self.tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
