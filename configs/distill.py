"""Logit distillation: a small student learns GSM8K text from a frozen teacher (docs/posttraining.md).

  lm train --config configs/quickstart.py --workdir runs/quickstart        # once: a base model
  lm train --config configs/distill.py --workdir runs/distill \
      --config.distill.teacher=runs/quickstart --config.data.tokenizer=runs/quickstart/tokenizer.model

The teacher (an lm run or a Hugging Face directory, any size, the student's vocabulary) rides
in the train state as frozen `teacher.*` weights; the student here is a 2-layer, d_model 128 model
trained from scratch. Per trained token the loss is (1 - distill.weight) * cross-entropy +
distill.weight * temperature^2 * divergence (forward_kl, reverse_kl or jsd). `:reverse_kl` and
`:jsd` pick the divergence.
"""

from lm.config import base_config

LOSSES = ('forward_kl', 'reverse_kl', 'jsd')


def get_config(arg='forward_kl'):
  if arg not in LOSSES:
    raise ValueError(f'configs/distill.py:{arg}; choose one of {LOSSES}')
  c = base_config()
  c.model.update(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=256,
                 max_seq_len=512)
  c.train.update(objective='distill', steps=200, log_every=10, eval_every=50, eval_batches=4,
                 checkpoint_every=100)
  c.distill.update(teacher='runs/quickstart', loss=arg, temperature=2.0, weight=0.5)
  c.data.update(train_files='../shared/data/gsm8k/train.jsonl', format='alpaca',
                fields='instruction=question,output=answer', chat_template='plain',
                train_on='all', tokenizer='runs/quickstart/tokenizer.model', seq_len=256,
                batch_size=8)
  c.optimizer.update(lr=2e-3, warmup_steps=10, weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  return c
