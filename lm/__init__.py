"""lm: a JAX training library for language models.

The few names a notebook needs (loaded lazily, so `import lm` stays cheap):

  cfg = lm.load_config('configs/quickstart.py', {'train.steps': 100})
  summary = lm.run_training(cfg, 'runs/demo')       # the whole run, as `lm train`
  trainer = lm.Trainer(cfg)                         # or single steps: trainer.step(state, batch)
  model = lm.load_model('runs/demo')                # a trained run (or a HF model directory)
  lm.complete(model, ['def main('], max_new_tokens=32)
  lm.evaluate_model(model, ['heldout_ppl'])
  params = lm.load_hf('path/to/hf_model', lm.ModelSpec(cfg.model), shardings)
  lm.plan(cfg, 'v5p-8')                              # compile the step for a TPU/GPU target, no hardware

See docs/api.md.
"""

from __future__ import annotations

import importlib
import sys

from lm import errors
from lm import host_memory
from lm import platforms

# On a host without accelerators: jax starts its CPU backend alone, without the installed TPU and
# CUDA plugins' tracebacks and log lines (lm/platforms.py).
platforms.quiet_start()

# Before jax starts its CPU backend: XLA's threads pick their malloc arena at their first allocation.
try:
  HOST_MALLOC_TUNED = host_memory.keep_freed_memory()
except errors.ConfigError as e:  # a bad LM_HOST_MALLOC: as the CLI reports bad input, one line, exit 2
  print(f'lm: error: {e}', file=sys.stderr)
  raise SystemExit(errors.EXIT_USER_ERROR) from None

_LAZY = {
    'Trainer': ('lm.train.loop', 'Trainer'),
    'run_training': ('lm.train.runner', 'train'),
    'ModelSpec': ('lm.model.spec', 'ModelSpec'),
    'load_model': ('lm.eval.evaluate', 'load_model'),
    'Sampling': ('lm.eval.generate', 'Sampling'),
    'base_config': ('lm.config', 'base_config'),
    'model_config': ('lm.config', 'model_config'),
    'load_hf': ('lm.io.hf', 'load_params'),
    'save_hf': ('lm.io.hf', 'save'),
    'plan': ('lm.bench.plan', 'plan'),
}

# Function names differ from the submodules (lm.train.loop, lm.eval.generate, lm.eval.evaluate): importing a
# submodule binds its name on the package and would shadow a function of the same name.
__all__ = ['load_config', 'complete', 'evaluate_model', *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f'module lm has no attribute {name!r}')


def load_config(path: str, overrides: dict | None = None):
  """A locked config from `configs/X.py[:arg]`, with `{'optimizer.lr': 1e-4, ...}` applied and
  validated exactly as `lm train --config ... --config.optimizer.lr=1e-4` would."""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config(path, overrides or {})


def complete(model, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop=(), seed: int = 0) -> list[str]:
  """Completions of `prompts` by a loaded model (lm.load_model), with a KV cache."""
  from lm.eval.generate import Sampling  # pylint: disable=import-outside-toplevel
  sampling = Sampling(max_new_tokens, temperature, top_k, top_p)
  return model.generator.generate(list(prompts), sampling, stop=list(stop), seed=seed)


def evaluate_model(model, tasks: list[str], **settings) -> dict:
  """{task: metrics} for a loaded model; tasks (built-in names or task files) and settings are those
  of `lm eval`."""
  from lm.eval import evaluate as evaluate_lib, tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  return evaluate_lib.run_tasks(model, list(tasks), tasks_lib.Settings(**settings), log=lambda _: None)
