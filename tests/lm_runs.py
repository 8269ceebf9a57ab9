"""Real `lm train` runs in subprocesses, on the smallest model that still trains, for the tests of
kills, signals, multi-host runs and bad inputs. A shared JAX compilation cache makes every run
after the first skip compilation (it does not change results: the same program runs)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, TEST_XLA_FLAGS

PYTHON = sys.executable

# configs/quickstart.py shrunk to a one-layer, 512-token model that runs a step in milliseconds.
TINY = ['--config', 'configs/quickstart.py', '--no-progress',
        '--config.data.tokenizer_vocab_size=512', '--config.model.vocab_size=512',
        '--config.model.d_model=32', '--config.model.n_layers=1', '--config.model.n_heads=2',
        '--config.model.n_kv_heads=1', '--config.model.mlp_dim=64', '--config.model.max_seq_len=32',
        '--config.data.seq_len=16', '--config.data.batch_size=4', '--config.train.steps=12',
        '--config.train.log_every=1', '--config.train.eval_every=1000',
        '--config.train.eval_batches=1', '--config.train.checkpoint_every=4',
        '--config.optimizer.warmup_steps=0', '--config.optimizer.schedule=constant',
        '--config.metrics.tensorboard=false', '--config.metrics.peak_flops_per_device=1e12']


def write_corpus(path: str, n_docs: int = 40) -> str:
  import pydoc_data.topics  # pylint: disable=import-outside-toplevel
  with open(path, 'w', encoding='utf-8') as f:
    for key in sorted(pydoc_data.topics.topics)[:n_docs]:
      f.write(json.dumps({'text': pydoc_data.topics.topics[key]}) + '\n')
  return path


def env(cache_dir: str, **extra) -> dict:
  out = {k: v for k, v in os.environ.items()
         if not k.startswith(('LM_', 'JAX_', 'XLA_FLAGS'))}
  # The session's shared compilation cache (conftest.py) when there is one.
  cache_dir = os.environ.get('LM_TEST_JAX_CACHE', cache_dir)
  out.update(PYTHONPATH=ROOT, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache_dir,
             XLA_FLAGS=TEST_XLA_FLAGS,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  out.update({k: str(v) for k, v in extra.items()})
  return out


def command(workdir: str, *args: str) -> list[str]:
  return [PYTHON, '-m', 'lm', 'train', '--workdir', str(workdir), *TINY, *args]


def run(workdir, *args, cache_dir, timeout=300, **extra_env) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, *args), cwd=ROOT, env=env(cache_dir, **extra_env),
                        capture_output=True, text=True, timeout=timeout)


def start(workdir, *args, cache_dir, **extra_env) -> subprocess.Popen:
  return subprocess.Popen(command(workdir, *args), cwd=ROOT, env=env(cache_dir, **extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(workdir) -> dict[int, float]:
  """Per-step training loss; a step logged twice (before a kill and after the resume) keeps the
  later value."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      m = json.loads(line)
      if 'loss' in m:
        out[m['step']] = m['loss']
  return out


def wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'run ended (rc {proc.returncode}) before step {step}: {proc.stderr.read()}')
    if os.path.exists(path) and any(json.loads(l).get('step', 0) >= step
                                    for l in open(path, encoding='utf-8') if l.strip()):
      return
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  raise AssertionError(f'no step {step} within {timeout}s')


def last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.startswith('lm: ')]
  return lines[-1] if lines else ''


def tiny_config(*overrides: str):
  """The config a TINY run builds, for checking its run directory in this process."""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load_config(os.path.join(ROOT, 'configs', 'quickstart.py'))
  args = [a for a in TINY if a.startswith('--config.')] + list(overrides)
  for key, value in config_lib.parse_overrides(args):
    config_lib.apply_override(cfg, key, value)
  return cfg


def damage_checkpoint(step_dir) -> None:
  """Truncates the largest array file of a checkpoint step to half its size."""
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def save_lora_run(run_dir, cfg):
  """A LoRA run directory as `lm train` leaves it (the adapters at step 3, the base rebuilt from
  the run's seed, config.json) with every lora_b moved off zero so merging changes the model.
  Returns (the Trainer, the run's parameters)."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from lm.train.loop import Trainer  # pylint: disable=import-outside-toplevel
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  state = trainer.init_state()
  params = {k: (v + 0.1 if k.endswith('lora_b') else v) for k, v in state.params.items()}
  ckpt = Checkpointer(str(run_dir), async_save=False, labels=trainer.labels)
  ckpt.save(3, state.replace(params=params), {'position': 3})
  ckpt.close()
  with open(os.path.join(str(run_dir), 'config.json'), 'w', encoding='utf-8') as f:
    f.write(cfg.to_json_best_effort())
  return trainer, params
