"""GRPO with verifiable rewards on GSM8K prompts (docs/posttraining.md).

  lm train --config configs/quickstart.py --workdir runs/quickstart      # once: a base model
  lm train --config configs/grpo.py --workdir runs/grpo                  # LoRA policy, GSM8K rewards
  # a chat model (e.g. SmolLM2-135M-Instruct): prompts as user turns of its own chat template
  lm train --config configs/grpo.py --workdir runs/grpo_chat \
      --config.train.init_from=../shared/data/smollm2-135m-instruct --config.grpo.chat_template=tokenizer

Each round samples data.batch_size / group_size prompts x group_size completions with the KV-cache
generator, scores them (exact answer + answer format, lm/eval/rewards.py), and takes
grpo.updates_per_batch steps of the one train step with the clipped GRPO objective. The KL
reference is the base with the LoRA adapters off. `:dapo` uses DAPO's clip-higher and token-mean
loss; `:dr_grpo` Dr. GRPO's unnormalised loss without std scaling.
"""

from lm.config import base_config

VARIANTS = ('grpo', 'dapo', 'dr_grpo')


def get_config(arg='grpo'):
  if arg not in VARIANTS:
    raise ValueError(f'configs/grpo.py:{arg}; choose one of {VARIANTS}')
  c = base_config()
  c.train.update(init_from='runs/quickstart', objective='grpo', steps=20, log_every=1,
                 checkpoint_every=10, trainable='lora')
  c.data.update(seq_len=192, batch_size=16)
  c.model.lora.update(rank=16, alpha=32.0, targets=r'layers\.(attn|mlp)\.')
  c.optimizer.update(lr=2e-4, warmup_steps=0, schedule='constant', weight_decay=0.0)
  c.grpo.update(prompts='../shared/data/gsm8k/train.jsonl',
                prompt_format='Question: {question}\nAnswer:',
                rewards='lm.eval.rewards.gsm8k_exact,lm.eval.rewards.answer_format',
                reward_weights=(1.0, 0.2), group_size=4, updates_per_batch=2, max_new_tokens=64,
                temperature=1.0, kl_coef=0.04, stop=('Question:',))
  if arg == 'dapo':
    c.grpo.update(clip_low=0.2, clip_high=0.28, loss_type='dapo', kl_coef=0.0)
  elif arg == 'dr_grpo':
    c.grpo.update(loss_type='dr_grpo', scale_rewards=False)
  c.metrics.update(tensorboard=False)
  return c
