"""Which loop a config trains with: GRPO's (sample -> score -> K steps) or the ordinary one. Both
drive the same train step (lm/train/step.py)."""

from __future__ import annotations

from lm.train import grpo_loop, loop


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) a training run; what `lm train` and `lm.run_training` call."""
  if cfg.train.objective == 'grpo':
    return grpo_loop.train(cfg, workdir, progress=progress)
  return loop.train(cfg, workdir, progress=progress)
