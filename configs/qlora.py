r"""QLoRA: LoRA fine-tuning (SFT on alpaca) over a base stored quantized, NF4 (default) or int8.

  lm train --config configs/quickstart.py --workdir runs/quickstart      # once: the base model
  lm train --config configs/qlora.py --workdir runs/qlora                # NF4 base, rank-16 adapters
  lm train --config configs/qlora.py:int8 --workdir runs/qlora_int8      # int8 base
  lm export --workdir runs/qlora --out runs/qlora_peft --adapters-only   # PEFT adapter (float base)

The layers' linear kernels are quantized with one scale per block of model.quant.block entries
when the state is created (loading quantizes on the way in), stored that way, and dequantized one
layer at a time in the forward (lm/model/quant.py, qwix). Embeddings, norms and the LM head stay
in float. The adapters train exactly as in configs/finetune_lora.py; exported adapters apply to
the unquantized base.
"""

from lm.config import base_config

QTYPES = ('nf4', 'int8')


def get_config(arg='nf4'):
  if arg not in QTYPES:
    raise ValueError(f'configs/qlora.py:{arg}; choose one of {QTYPES}')
  c = base_config()
  c.model.quant.update(type=arg, block=64)
  c.model.lora.update(rank=16, alpha=32.0, targets=r'layers\.(attn|mlp)\.')
  c.train.update(init_from='runs/quickstart', trainable='lora', steps=60, log_every=10,
                 eval_every=60, eval_batches=4, checkpoint_every=60)
  c.data.update(train_files='../shared/data/alpaca5k/alpaca_5000.json', format='alpaca',
                seq_len=256, batch_size=8)
  c.optimizer.update(lr=2e-3, warmup_steps=10, schedule='cosine', weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  return c
