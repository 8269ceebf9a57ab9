r"""LoRA fine-tuning of a real model: SmolLM2-135M-Instruct, read from its llama.cpp GGUF file
(Q4_1, dequantized on load), on alpaca with the model's own chat template (ChatML, embedded in the
file). docs/smollm2.md walks through it:

  lm train --config configs/finetune_smollm2.py --workdir runs/smollm2_lora
  lm generate runs/smollm2_lora --chat --prompt 'Give three tips for staying healthy.'
  lm export --workdir runs/smollm2_lora --out runs/smollm2_lora.gguf --format gguf --dtype q8_0

The model's shape and tokenizer come from the GGUF file (train.init_from); only the rank-8
adapters on the attention and MLP projections train.
"""

from lm.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.model.lora.update(rank=8, alpha=16.0, dropout=0.0, targets=r'layers\.(attn|mlp)\.')
  c.train.update(init_from='../shared/data/smollm2-135m-instruct', trainable='lora', steps=40,
                 log_every=5, eval_every=40, eval_batches=2, checkpoint_every=40)
  c.data.update(train_files='../shared/data/alpaca5k/alpaca_5000.json', format='alpaca',
                chat_template='tokenizer', seq_len=256, batch_size=8)
  c.optimizer.update(lr=1e-3, warmup_steps=4, schedule='cosine', weight_decay=0.0)
  c.metrics.update(tensorboard=False)
  return c
