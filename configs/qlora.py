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

import os

from lm.config import load_module

QTYPES = ('nf4', 'int8')


def get_config(arg='nf4'):
  if arg not in QTYPES:
    raise ValueError(f'configs/qlora.py:{arg}; choose one of {QTYPES}')
  # configs/finetune_lora.py's run (same adapters, data and schedule), over a quantized base.
  lora = load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'finetune_lora.py'))
  c = lora.get_config()
  c.model.quant.update(type=arg, block=64)
  return c
