r"""GSM8K fine-tuning of SmolLM2-135M-Instruct (the GGUF file), LoRA or full: docs/evaluation.md's
worked example.

  python -m lm.eval.tasks gsm8k-train-text runs/data/gsm8k_train.jsonl   # the 500 held-out excluded
  lm train --config configs/finetune_smollm2_gsm8k.py:lora --workdir runs/smollm2_gsm8k_lora
  lm train --config configs/finetune_smollm2_gsm8k.py:full --workdir runs/smollm2_gsm8k_full

It trains on the text the gsm8k tasks prompt with ("Question: ...\nAnswer: ... #### N"), so
training and evaluation see one format (the tasks' prompts are plain text, not the model's chat
template). 30 steps of 4 x 256 tokens, about 11 minutes each on 2 shared CPU cores; `:lora`
trains rank-8 adapters on every attention and MLP projection, `:full` every weight.
"""

from lm.config import base_config
from lm.errors import ConfigError


def get_config(arg=None):
  mode = arg or 'lora'
  if mode not in ('lora', 'full'):
    raise ConfigError(f'configs/finetune_smollm2_gsm8k.py:{mode}; write :lora or :full')
  c = base_config()
  c.train.update(init_from='../shared/data/smollm2-135m-instruct', steps=30, log_every=5,
                 eval_every=30, eval_batches=2, checkpoint_every=30)
  c.data.update(train_files='runs/data/gsm8k_train.jsonl', format='text', seq_len=256,
                batch_size=4)
  c.optimizer.update(warmup_steps=3, schedule='cosine', weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  if mode == 'lora':
    c.model.lora.update(rank=8, alpha=16.0, dropout=0.0, targets=r'layers\.(attn|mlp)\.')
    c.train.trainable = 'lora'
    c.optimizer.lr = 1e-3
  else:
    c.train.trainable = 'all'
    c.optimizer.lr = 5e-5
  return c
