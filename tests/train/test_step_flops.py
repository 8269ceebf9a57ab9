"""The FLOPs a step needs per mode, as the training loop's MFU counts them (tests/bench/test_plan.py
checks the counts themselves against the compiled step; tests/eval/test_compare.py checks a LoRA
run's logged MFU)."""

import math

import jax
from conftest import tiny_config

from lm.train import flops, step_flops
from lm.train.loop import Trainer


def test_a_lora_step_needs_fewer_flops_per_token_than_full_training():
  """Full training needs 6N per token plus the token mixers (flops.train_flops_per_token, which MFU
  used to count whatever trained); LoRA takes no gradient of the frozen base weights (~4N)."""
  c = tiny_config()
  full = step_flops.batch_token_flops(Trainer(c, devices=jax.devices()[:1]))
  c.model.lora.update(rank=4, alpha=8.0, targets=r'attn\.(q|k|v)|mlp')
  c.train.trainable = 'lora'
  trainer = Trainer(c, devices=jax.devices()[:1])
  lora = step_flops.batch_token_flops(trainer)
  assert full == flops.train_flops_per_token(c.model, c.data.seq_len)
  # Each frozen base matmul weight skips its own gradient (2 FLOPs a parameter); each adapter
  # weight costs 6 as any trained one (its input's gradient still flows down to the first layer).
  size = lambda suffix: sum(math.prod(s.shape) for n, s in trainer.spec.shapes.items()
                            if n.endswith(suffix))
  assert lora == full - 2 * size('.kernel') + 6 * (size('.lora_a') + size('.lora_b')) < full
  assert lora * c.data.batch_size * c.data.seq_len == step_flops.step_flops(trainer).model
