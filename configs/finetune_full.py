"""Full fine-tuning (SFT on alpaca) from a pretrained checkpoint: every weight trains.

  lm train --config configs/quickstart.py --workdir runs/quickstart      # once: the base model
  lm train --config configs/finetune_full.py --workdir runs/ft_full

A few minutes on 2 CPU cores. The model's shape and tokenizer come from `train.init_from`: an lm
run directory (default: the quickstart's) or a local Hugging Face model directory,
  --config.train.init_from=/models/Qwen2.5-0.5B
Continued pretraining is the same run on text:
  --config.data.format=text --config.data.train_files=../shared/data/tinyshakespeare/input.txt
Other partitions are one value: --config.train.trainable=freeze_embeddings (norms, bitfit,
freeze_first_layers:N, regex:...; see lm/train/partition.py).
"""

from lm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.train.update(init_from='runs/quickstart', trainable='all', steps=60, log_every=10,
                 eval_every=60, eval_batches=4, checkpoint_every=60)
  c.data.update(train_files='../shared/data/alpaca5k/alpaca_5000.json', format='alpaca',
                seq_len=256, batch_size=8)
  c.optimizer.update(lr=3e-4, warmup_steps=10, schedule='cosine', weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  return c
