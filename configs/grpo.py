"""GRPO with verifiable rewards on GSM8K prompts (docs/posttraining.md).

  lm train --config configs/quickstart.py --workdir runs/quickstart      # once: a base model
  lm train --config configs/grpo.py --workdir runs/grpo                  # LoRA policy, GSM8K rewards
  # a chat model (e.g. SmolLM2-135M-Instruct): prompts as user turns of its own chat template
  lm train --config configs/grpo.py --workdir runs/grpo_chat \
      --config.train.init_from=../shared/data/smollm2-135m-instruct --config.grpo.chat_template=tokenizer

Each round samples data.batch_size / group_size prompts x group_size completions with the rollout
engine (lm/eval/rollout.py), scores them (exact answer + answer format, lm/eval/rewards.py), and
takes grpo.updates_per_batch steps of the one train step with the clipped GRPO objective. The KL
reference is the base with the LoRA adapters off. `:dapo` uses DAPO's clip-higher and token-mean
loss; `:dr_grpo` Dr. GRPO's unnormalised loss without std scaling; `:gspo` GSPO's sequence-level
ratio with its narrow clip range (3e-4, 4e-4) and no KL, as its paper and TRL set it; `:distill`
on-policy distillation: the student samples, the teacher named by --config.distill.teacher scores
each sampled token (rewards still scored and logged, weight 0).

Environments (lm/eval/environments.py), on SmolLM2-135M-Instruct in its chat template:
  `:gym`         reasoning-gym's chain_sum (a +- b, one digit each) with a held-out reward every 3
                 rounds: the learning curve of docs/posttraining.md
  `:calculator`  GSM8K with a calculator tool (<calc>...</calc>; tool output masked from the loss)
"""

from lm.config import base_config

VARIANTS = ('grpo', 'dapo', 'dr_grpo', 'gspo', 'distill', 'gym', 'calculator')
SMOLLM2 = '../shared/data/smollm2-135m-instruct'


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
  elif arg == 'gspo':
    c.grpo.update(importance_level='sequence', clip_low=3e-4, clip_high=4e-4, kl_coef=0.0)
  elif arg == 'distill':
    c.grpo.update(teacher_coef=1.0, reward_weights=(0.0, 0.0), kl_coef=0.0)
  elif arg == 'gym':
    # Microbatches of 8 rows and a chunked loss keep the step's memory small on a shared machine.
    c.train.update(init_from=SMOLLM2, steps=120, checkpoint_every=20, microbatches=4)
    c.data.update(seq_len=96, batch_size=32)
    c.model.update(loss_chunk_size=32)
    c.optimizer.update(lr=3e-4)
    c.grpo.update(environment='lm.eval.environments.ReasoningGym:chain_sum,min_terms=2,max_terms=2,'
                              'min_digits=1,max_digits=1,size=2000,seed=0',
                  chat_template='tokenizer', group_size=8, max_new_tokens=20, temperature=0.7,
                  kl_coef=0.0, stop=(), eval_size=64, eval_every=3)
  elif arg == 'calculator':
    c.train.update(init_from=SMOLLM2)
    c.data.update(seq_len=384)
    c.grpo.update(environment='lm.eval.environments.Calculator:3', chat_template='tokenizer',
                  max_new_tokens=96, temperature=0.7, stop=())
  c.metrics.update(tensorboard=False)
  return c
