"""The fixed benchmark shape. Do not change it: figures stay comparable over time.

vocab 8192, d_model 256, 4 layers, 4 heads with 2 KV heads, MLP 704, untied embeddings,
batch 8 x 256 tokens, AdamW, float32.

  lm bench --config configs/bench_tiny.py
"""

from lm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.update(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, mlp_dim=704,
                 tie_embeddings=False, param_dtype='float32', compute_dtype='float32',
                 max_seq_len=256)
  c.data.update(seq_len=256, batch_size=8)
  c.optimizer.update(name='adamw', lr=3e-4, warmup_steps=0, schedule='constant')
  c.train.update(steps=100)
  return c
