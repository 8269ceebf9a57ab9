"""Where metrics go: metrics.jsonl and TensorBoard event files in the workdir."""

from __future__ import annotations

import json
import os

from lm.train import rundir


class MetricWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    # `inside`: a metrics.jsonl or tensorboard/ symlinked out of the run is refused, not followed.
    self.jsonl = open(rundir.inside(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self.tb = None
    if tensorboard:
      self.tb = _summary_writer(rundir.inside(workdir, 'tensorboard'))

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


def _summary_writer(logdir: str):
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch when it is
  installed (seconds of start-up) only to accept torch tensors, and lm writes Python floats."""
  import sys  # pylint: disable=import-outside-toplevel
  hide_torch = 'torch' not in sys.modules
  if hide_torch:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hide_torch:
      del sys.modules['torch']  # a later `import torch` (the HF comparisons) works as usual
  return SummaryWriter(logdir)
