"""LoRA adapters as PEFT files.

`save_peft` writes adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained(hf_base, path)` loads onto the exported HF base; `load_peft`
reads such a directory (from lm or from PEFT) into adapter entries and the lm lora config.
"""

from __future__ import annotations

import json
import os
import re

import jax
import numpy as np

from lm.config import n_experts
from lm.errors import CheckpointError, read_json
from lm.io import hf
from lm.io.families import REGISTRY
from lm.io.safetensors import Reader, write
from lm.model import stack as stack_lib
from lm.model.lora import is_adapter, modules, split

PEFT_PREFIX = 'base_model.model.'
# lm module -> HF module over every family: the Llama names and those only some families have
# (DeepSeek's q_a_proj, kv_b_proj, ...); and PEFT's short names for them (target_modules).
_ALL_MODULES = {**hf.MODULES, **{m: n for f in REGISTRY.values() for m, n in f.modules.items()}}
_HF_SHORT = {module: hf_module.rsplit('.', 1)[-1] for module, hf_module in _ALL_MODULES.items()}


# Families whose dense MLP names PEFT (0.21) takes for Mixture-of-Experts weights: for these
# model types it rewrites target_modules gate_proj/up_proj/down_proj into the experts' fused
# parameters (peft/utils/transformers_weight_conversion.py), so adapters on a dense MLP would
# silently not load.
PEFT_MLP_AS_EXPERTS = ('deepseek_v3',)


def _family(model_cfg) -> str:
  """The HF family the model exports as; '' when no HF architecture expresses it."""
  try:
    return hf.family_of(model_cfg)
  except CheckpointError:
    return ''


def _hf_module(module: str, model_cfg) -> str:
  """The HF module ({i}: layer) of lm module `module`, from the tensor table of the family the
  model exports as; a model no HF architecture expresses keeps the Llama names."""
  family = _family(model_cfg)
  if family in REGISTRY:
    kernel = module + '.kernel'
    entry = hf.param_map({kernel: None}, family, model_cfg).get(kernel)
    if entry is None:  # part of a fused HF tensor (Qwen3.5's q_proj with the gate, in_proj_qkv)
      raise CheckpointError(f'PEFT export of LoRA on {module} is not supported for {family}: its '
                            'Hugging Face tensor holds other parameters too; merge the adapters '
                            '(lm export without --adapters-only) or leave it out of '
                            'model.lora.targets')
    return entry[0].removesuffix('.weight')
  if module not in hf.MODULES:
    raise CheckpointError(f'PEFT export of LoRA on {module} is not supported for this model')
  return hf.MODULES[module]


def _peft_names(module: str, model_cfg) -> list[str]:
  """PEFT's module names for lm module `module`: one per row of its stack (its model layers)."""
  base = PEFT_PREFIX + _hf_module(module, model_cfg)
  layers = stack_lib.layer_rows(model_cfg, module)
  return [base] if layers is None else [base.format(i=i) for i in layers]


def save_peft(path: str, params: dict, model_cfg, *, base_model: str = '') -> None:
  """The adapter entries of `params` as a PEFT LoRA directory."""
  _, adapter = split(params)
  if not adapter:
    raise CheckpointError('no LoRA adapters in these parameters (model.lora.rank is 0)')
  if model_cfg.get('hf_family') in hf.FUSED:
    raise CheckpointError(f'PEFT adapters for {model_cfg.hf_family} (fused qkv_proj and '
                          'gate_up_proj) are not supported; export the merged model instead')
  experts = [m for m in modules(adapter) if m.startswith('layers.moe.')]
  if experts and n_experts(model_cfg):
    raise CheckpointError(f'PEFT export of LoRA on experts ({experts[0]}) is not supported; merge '
                          'them (lm export without --adapters-only) or adapt only attention '
                          r"(model.lora.targets='layers\.attn\.')")
  mlp = [m for m in modules(adapter) if m.startswith('layers.mlp.')]
  if mlp and _family(model_cfg) in PEFT_MLP_AS_EXPERTS:
    raise CheckpointError(f'PEFT export of LoRA on {mlp[0]} is not supported for '
                          f'{_family(model_cfg)}: PEFT loads its gate_proj/up_proj/down_proj as '
                          "experts' weights and would drop these adapters; merge them (lm export "
                          r"without --adapters-only) or adapt only attention (model.lora.targets='layers\.attn\.')")
  lora_cfg = model_cfg.lora
  os.makedirs(path, exist_ok=True)
  tensors = {}
  for module in modules(adapter):
    a, b = hf.host(adapter[module + '.lora_a']), hf.host(adapter[module + '.lora_b'])
    names = _peft_names(module, model_cfg)
    a_layers = a if module.startswith('layers.') else a[None]
    b_layers = b if module.startswith('layers.') else b[None]
    n_in = a_layers.ndim - 2  # a: [L, *in, r]
    for name, a_i, b_i in zip(names, a_layers, b_layers):
      tensors[name + '.lora_A.weight'] = np.ascontiguousarray(hf.to_hf(a_i, n_in))
      tensors[name + '.lora_B.weight'] = np.ascontiguousarray(hf.to_hf(b_i, 1))
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM', 'base_model_name_or_path': base_model or None,
      'r': int(lora_cfg.rank), 'lora_alpha': float(lora_cfg.alpha),
      'lora_dropout': float(lora_cfg.dropout), 'use_rslora': bool(lora_cfg.rslora),
      'target_modules': sorted({_hf_module(m, model_cfg).rsplit('.', 1)[-1]
                                for m in modules(adapter)}), 'bias': 'none',
      'fan_in_fan_out': False, 'modules_to_save': None, 'init_lora_weights': True,
      'inference_mode': True, 'use_dora': False}
  if jax.process_index() == 0:
    write(os.path.join(path, 'adapter_model.safetensors'), tensors, {'format': 'pt'})
    with open(os.path.join(path, 'adapter_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)


def lora_config_from_peft(config: dict) -> dict:
  """adapter_config.json -> lm `model.lora` fields (errors for what lm cannot represent)."""
  if config.get('peft_type', 'LORA') != 'LORA':
    raise CheckpointError(f'peft_type {config.get("peft_type")!r} is not LoRA')
  for key, ok in (('use_dora', False), ('bias', 'none'), ('fan_in_fan_out', False)):
    if config.get(key, ok) not in (ok, None):
      raise CheckpointError(f'PEFT adapter with {key}={config[key]!r} is not supported')
  for key in ('layers_to_transform', 'modules_to_save', 'rank_pattern', 'alpha_pattern'):
    if config.get(key):
      raise CheckpointError(f'PEFT adapter with {key} is not supported (one rank for all layers)')
  targets = config.get('target_modules') or []
  if targets == 'all-linear':
    chosen = [m for m in _ALL_MODULES if m != 'lm_head']
  elif isinstance(targets, str):
    chosen = [m for m, short in _HF_SHORT.items() if re.fullmatch(targets, _ALL_MODULES[m].format(i=0))
              or re.fullmatch(targets, short)]
  else:
    chosen = [m for m, short in _HF_SHORT.items() if short in targets]
  if not chosen:
    raise CheckpointError(f'PEFT target_modules {targets!r} match no lm module')
  return dict(rank=int(config['r']), alpha=float(config.get('lora_alpha', 8)),
              dropout=float(config.get('lora_dropout', 0.0)),
              rslora=bool(config.get('use_rslora', False)),
              targets='^(' + '|'.join(re.escape(m) for m in chosen) + ')$')


def read_peft_config(path: str) -> dict:
  file = os.path.join(path, 'adapter_config.json')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has no adapter_config.json; not a PEFT adapter directory')
  return read_json(file, 'PEFT adapter config', CheckpointError)


def load_peft(path: str, spec, shardings: dict | None = None) -> dict:
  """Adapter entries for `spec` (a ModelSpec whose lora config came from lora_config_from_peft)
  read from PEFT directory `path`, placed with `shardings` when given."""
  file = os.path.join(path, 'adapter_model.safetensors')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has no adapter_model.safetensors')
  reader = Reader(file)
  # PEFT saves without the adapter name; files saved with it ('.lora_A.default.weight') also load.
  renamed = {re.sub(r'\.lora_([AB])\.[^.]+\.weight$', r'.lora_\1.weight', n): n for n in reader.names()}
  plan, expected = {}, {}
  for name in spec.names:
    if not is_adapter(name):
      continue
    module, kind = name.rsplit('.', 1)
    shape = spec.shapes[name].shape
    stacked = module.startswith('layers.')
    one = shape[1:] if stacked else shape
    layout = len(one) - 1 if kind == 'lora_a' else 1
    suffix = '.lora_A.weight' if kind == 'lora_a' else '.lora_B.weight'
    names = [n + suffix for n in _peft_names(module, spec.cfg)]
    for n in names:
      if n not in renamed:
        raise CheckpointError(f'{file}: tensor {n!r} is missing (lm parameter {name!r})')
      expected[renamed[n]] = (hf.hf_shape(one, layout), name)
    plan[name] = (names, stacked, layout)
  for n, (shape, lm_name) in expected.items():
    if tuple(reader.shape(n)) != tuple(shape):
      raise CheckpointError(f'{file}: tensor {n!r} has shape {tuple(reader.shape(n))}, expected '
                            f'{tuple(shape)} (lm parameter {lm_name!r}; is the rank right?)')
  extra = sorted(set(reader.names()) - set(expected))
  if extra:
    raise CheckpointError(f'{file}: tensor {extra[0]!r} matches no adapted lm module')
  out = {}
  for name, (names, stacked, layout) in plan.items():
    shape = spec.shapes[name].shape
    read = hf.read_stacked(_Renamed(reader, renamed), names, shape, layout,
                           spec.shapes[name].dtype, stacked)
    sharding = (shardings or {}).get(name) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out[name] = hf.place(shape, sharding, read)
  return out


class _Renamed:
  def __init__(self, reader, renamed):
    self.reader, self.renamed = reader, renamed

  def read(self, name, *args):
    return self.reader.read(self.renamed[name], *args)
