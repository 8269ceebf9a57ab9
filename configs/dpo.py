"""DPO on the shared preference demo (LLaMA-Factory's dpo_en_demo), from a pretrained checkpoint.

  lm train --config configs/quickstart.py --workdir runs/quickstart      # once: the base model
  lm train --config configs/dpo.py --workdir runs/dpo                    # LoRA policy
  lm train --config configs/dpo.py:full --workdir runs/dpo_full          # every weight trains

With LoRA (default) the reference policy is the same base with the adapters switched off, so no
second copy of the weights exists. `:full` trains every weight against a frozen `ref.*` copy that
gets no gradient and no optimizer state. Metrics: loss, reward_accuracy, reward_margin,
chosen_reward, rejected_reward. A few minutes on 2 CPU cores.
"""

from lm.config import base_config


def get_config(arg='lora'):
  if arg not in ('lora', 'full'):
    raise ValueError(f'configs/dpo.py:{arg}; choose lora or full')
  c = base_config()
  c.train.update(init_from='runs/quickstart', objective='dpo', steps=30, log_every=5,
                 eval_every=30, eval_batches=2, checkpoint_every=30)
  c.dpo.update(beta=0.1)
  c.data.update(train_files='../shared/data/llamafactory-dpo-demo/dpo_en_demo.json',
                format='preference', seq_len=384, batch_size=8, eval_fraction=0.05)
  if arg == 'lora':
    c.model.lora.update(rank=16, alpha=32.0, targets=r'layers\.(attn|mlp)\.')
    c.train.trainable = 'lora'
    c.optimizer.update(lr=1e-3, warmup_steps=5, schedule='cosine', weight_decay=0.0)
  else:
    c.train.trainable = 'all'
    c.optimizer.update(lr=1e-4, warmup_steps=5, schedule='cosine', weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  return c
