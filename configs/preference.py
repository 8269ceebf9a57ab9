"""The DPO family beyond DPO on the shared preference demo, from a pretrained checkpoint.

  lm train --config configs/quickstart.py --workdir runs/quickstart        # once: the base model
  lm train --config configs/preference.py:ipo --workdir runs/ipo          # IPO (frozen reference)
  lm train --config configs/preference.py:simpo --workdir runs/simpo      # SimPO (reference-free)
  lm train --config configs/preference.py:orpo --workdir runs/orpo        # ORPO (reference-free)
  lm train --config configs/preference.py:kto --workdir runs/kto          # KTO (unpaired examples)

LoRA adapters train; the reference of IPO and KTO is the base with the adapters off. KTO reads
the same pairs as labelled examples (data.format=kto: chosen desirable, rejected undesirable); a
file of {prompt, completion, label} records reads the same way. Held-out evaluation reports the
loss, reward accuracy and reward margin (docs/posttraining.md).
"""

from lm.config import base_config

OBJECTIVES = ('ipo', 'simpo', 'orpo', 'kto')


def get_config(arg='simpo'):
  if arg not in OBJECTIVES:
    raise ValueError(f'configs/preference.py:{arg}; choose one of {OBJECTIVES}')
  c = base_config()
  c.train.update(init_from='runs/quickstart', objective=arg, steps=30, log_every=5,
                 eval_every=30, eval_batches=2, checkpoint_every=30, trainable='lora')
  c.data.update(train_files='../shared/data/llamafactory-dpo-demo/dpo_en_demo.json',
                format='kto' if arg == 'kto' else 'preference', seq_len=384, batch_size=8,
                eval_fraction=0.05)
  c.model.lora.update(rank=16, alpha=32.0, targets=r'layers\.(attn|mlp)\.')
  c.optimizer.update(lr=1e-3, warmup_steps=5, schedule='cosine', weight_decay=0.0)
  c.dpo.update(beta=0.1)  # IPO's and KTO's beta
  c.preference.update(simpo_beta=2.0, simpo_gamma=1.0, orpo_weight=0.1)
  c.metrics.update(tensorboard=False)
  return c
