"""A learning-rate sweep over a shrunken quickstart: three runs of ~20 steps, seconds each on CPU.

  python -m launch.sweep --config configs/sweep_lr.py --workdir runs/sweep_lr

`get_config` is configs/quickstart.py made tiny; `get_hyper` (read by launch/sweep.py) sweeps
`optimizer.lr`. A single run of it is still an ordinary config:
  lm train --config configs/sweep_lr.py --workdir runs/one --config.optimizer.lr=1e-3
"""

import importlib.util
import os


def _quickstart():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'quickstart.py')
  spec = importlib.util.spec_from_file_location('lm_config_quickstart', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  c = _quickstart().get_config(arg)
  c.model.update(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=128,
                 max_seq_len=128)
  c.data.update(tokenizer_vocab_size=512, seq_len=64, batch_size=8)
  c.optimizer.update(warmup_steps=5)
  c.train.update(steps=20, log_every=5, eval_every=10, eval_batches=2, checkpoint_every=20)
  c.metrics.update(tensorboard=False)
  return c


def get_hyper(hyper):
  return hyper.product([
      hyper.sweep('config.optimizer.lr', [3e-3, 1e-3, 3e-4]),
  ])
