"""QLoRA's quantization error on a real model: logits of the int8 / NF4 base against float.

  python -m lm.bench.quant SOURCE [--rows 16] [--len 128]

Loads the weights in float (an lm run, its LoRA adapters merged; a Hugging Face directory; a GGUF
file or a directory holding one, dequantized as `train.init_from` reads it),
quantizes the layers' linear kernels as `model.quant` would (lm/model/quant.py), and compares the
logits on held-out GSM8K text (../shared/data/gsm8k): mean |dlogit| and top-1 agreement over every
position, and the kernels' packed size.
"""

from __future__ import annotations

import argparse

import jax
import ml_collections
import numpy as np

from lm import config as config_lib
from lm import sharding as sharding_lib
from lm.data import tokenizer as tokenizer_lib
from lm.eval import task_data
from lm.io import pretrained, runs
from lm.model import quant
from lm.train.state import ModelSpec


def compare(source: str, rows: int = 16, length: int = 128, settings=(('int8', 64), ('nf4', 64),
                                                                      ('nf4', 32))) -> list[dict]:
  cfg, tokenizer = _config_and_tokenizer(source)
  model_cfg = quant.without_quant(cfg.model)
  spec = ModelSpec(model_cfg)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ('data', 'fsdp', 'tensor'))
  shardings = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, (('embed', None),))
  params = pretrained.load_params(source, spec, shardings)
  ids = np.full((rows, length), tokenizer.pad_id, np.int32)
  real = np.zeros((rows, length), bool)  # by length: a tokenizer's pad id may also be a real token
  for i, row in enumerate(task_data.gsm8k('eval')[:rows]):
    text = f'Question: {row["question"]}\nAnswer: {row["answer"]}'  # the gsm8k tasks' form
    encoded = tokenizer.encode(text, bos=tokenizer.add_bos)[:length]
    ids[i, :len(encoded)] = encoded
    real[i, :len(encoded)] = True
  reference = np.asarray(jax.jit(lambda p, t: spec.bind(p)(t))(params, ids))
  out = []
  for qtype, block in settings:
    qcfg = ml_collections.ConfigDict(model_cfg.to_dict())
    qcfg.quant = ml_collections.ConfigDict(dict(type=qtype, block=block))
    qspec = ModelSpec(qcfg)
    qparams = jax.jit(qspec.init)(jax.random.key(0), dict(params))
    logits = np.asarray(jax.jit(lambda p, t, s=qspec: s.bind(p)(t))(qparams, ids))
    out.append({
        'qtype': qtype, 'block': block,
        'mean_abs_dlogit': float(np.abs(logits - reference)[real].mean()),
        'mean_abs_logit': float(np.abs(reference)[real].mean()),
        'top1_agreement': float((logits.argmax(-1) == reference.argmax(-1))[real].mean()),
        'tokens': int(real.sum()),
        'float_mb': sum(int(params[n].size) * params[n].dtype.itemsize for n in qspec.quantized) / 1e6,
        'quantized_mb': sum(quant.storage_bytes(qparams[n], qparams[n + quant.SCALE_SUFFIX])
                            for n in qspec.quantized) / 1e6})
  return out


def _config_and_tokenizer(source: str):
  """(config, tokenizer) of an lm run, or of a Hugging Face directory or GGUF file read as
  `train.init_from` reads it (its architecture and tokenizer; float32 as the config's default)."""
  if runs.kind(source, 'source') == 'lm':
    cfg = runs.load_config(source)
    return cfg, runs.run_tokenizer(source, cfg)
  cfg = config_lib.base_config()
  cfg.train.init_from = source
  pretrained.resolve_config(cfg)
  if not cfg.data.tokenizer:
    raise SystemExit(f'{source} has no tokenizer.json or tokenizer.model')
  return cfg, tokenizer_lib.load(cfg.data.tokenizer)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m lm.bench.quant')
  parser.add_argument('source', help='an lm run directory, a Hugging Face directory or a GGUF file (or its directory)')
  parser.add_argument('--rows', type=int, default=16)
  parser.add_argument('--len', type=int, default=128)
  args = parser.parse_args(argv)
  for r in compare(args.source, args.rows, args.len):
    print(f'{r["qtype"]} block {r["block"]}: mean |dlogit| {r["mean_abs_dlogit"]:.4f} (mean |logit| '
          f'{r["mean_abs_logit"]:.3f}), top-1 agreement {r["top1_agreement"]:.4f} over {r["tokens"]} '
          f'tokens; layer kernels {r["float_mb"]:.2f} MB float -> {r["quantized_mb"]:.2f} MB')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
