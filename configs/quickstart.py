"""Quickstart: pretrain a small Llama-style model offline on CPython's own documentation.

  lm train --config configs/quickstart.py --workdir runs/quickstart

About 12 minutes on 2 CPU cores. Another corpus is one override:
  --config.data.train_files=../shared/data/tinyshakespeare/input.txt
"""

from lm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.update(vocab_size=2048, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=704,
                 max_seq_len=1024)
  c.data.update(train_files='builtin:python-docs', tokenizer_vocab_size=2048, seq_len=256,
                batch_size=16)
  c.optimizer.update(lr=3e-3, warmup_steps=100, weight_decay=0.1)
  # ~2M tokens: about 12 minutes at the ~2,900 tokens/s a 2-core CPU gives this model.
  c.train.update(steps=500, log_every=10, eval_every=100, eval_batches=16, checkpoint_every=100)
  return c
