r"""LoRA fine-tuning (SFT on alpaca): rank-16 adapters on every linear layer of the blocks; only
the adapters get gradients and optimizer state. The base weights never change.

  lm train --config configs/quickstart.py --workdir runs/quickstart      # once: the base model
  lm train --config configs/finetune_lora.py --workdir runs/ft_lora
  lm export --workdir runs/ft_lora --out runs/ft_lora_peft --adapters-only   # PEFT adapter
  lm export --workdir runs/ft_lora --out runs/ft_lora_hf                     # merged HF model

A few minutes on 2 CPU cores. `train.init_from` may also be a local Hugging Face model directory.
Variants: --config.model.lora.targets='attn\.(q|v)' (PEFT's classic q_proj/v_proj),
--config.model.lora.rslora=True, --config.model.lora.dropout=0.05.
"""

from lm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.lora.update(rank=16, alpha=32.0, dropout=0.0, rslora=False,
                      targets=r'layers\.(attn|mlp)\.')
  c.train.update(init_from='runs/quickstart', trainable='lora', steps=60, log_every=10,
                 eval_every=60, eval_batches=4, checkpoint_every=60)
  c.data.update(train_files='../shared/data/alpaca5k/alpaca_5000.json', format='alpaca',
                seq_len=256, batch_size=8)
  c.optimizer.update(lr=2e-3, warmup_steps=10, schedule='cosine', weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  return c
