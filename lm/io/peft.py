"""LoRA adapters as PEFT files.

`save_peft` writes adapter_config.json + adapter_model.safetensors that
`peft.PeftModel.from_pretrained(hf_base, path)` loads onto the exported HF base; `load_peft`
reads such a directory (from lm or from PEFT) into adapter entries and the lm lora config.

Adapters on experts go out as PEFT's `target_parameters` (PEFT >= 0.17): transformers holds a
layer's experts as two 3-D parameters, `gate_up_proj` [E, 2F, D] and `down_proj` [E, D, F], of
one module (`EXPERTS`: `mlp.experts` for Mixtral, Qwen3-MoE and GLM-4.5; Gemma 4's `experts`
beside its dense MLP), and PEFT adapts each with lora_A [E·r, in] (expert-major rows) and lora_B
[out, r·E] (rank-major columns). lm's separate gate and up adapters (rank r each) are one exact
rank-2r adapter on gate_up_proj: A stacks both, B is block-diagonal, and `rank_pattern` /
`alpha_pattern` give it rank 2r at the same scale. PEFT wraps gate_up_proj first (the module's
first parameter), so with both adapted its tensors are `experts.base_layer.lora_*` and
down_proj's `experts.lora_*`. PEFT has no adapter dropout on parameters: such an export says
lora_dropout 0 (dropout only acts in training).
For Mixtral, Qwen3-MoE and GLM-4.5 PEFT rewrites target_modules gate_proj/up_proj/down_proj into
the experts' parameters, so adapters on their dense MLP layers or shared experts are refused;
Gemma 4's dense MLP is a plain `mlp.*_proj` module and exports beside its experts.

Reading them back (`lora_config_from_peft` + `load_peft`), from lm's export or from PEFT itself,
undoes this: gate_up_proj's rank-R adapter is lm's gate and up adapters sharing its A, with B's
gate and up rows. lm has one rank and one scale for every adapter, so a file whose ranks differ
(`rank_pattern`, `alpha_pattern`, as every expert export has) loads at the largest rank, the
smaller adapters padded with zero rows and columns and each module's scale folded into its B:
the same function, within float rounding.
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np

from lm.errors import CheckpointError, read_json
from lm.io import hf
from lm.io.families import REGISTRY
from lm.io.families.common import LAYER
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
# parameters (peft/utils/transformers_weight_conversion.py: Mixtral and every model type it maps
# to qwen2_moe), so adapters on a dense MLP or a shared expert would silently not load.
PEFT_MLP_AS_EXPERTS = ('deepseek_v3', 'glm4_moe', 'qwen3_moe', 'mixtral')


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


# Family -> the transformers module ({i}: layer) of its experts, gate_up_proj [E, 2F, D] and
# down_proj [E, D, F] (Family.experts for the families of lm/io/families/).
MLP_EXPERTS = LAYER + 'mlp.experts'
EXPERTS = {'mixtral': MLP_EXPERTS, 'qwen3_moe': MLP_EXPERTS,
           **{name: f.experts for name, f in REGISTRY.items() if f.experts}}
PEFT_EXPERT_FAMILIES = tuple(EXPERTS)
EXPERT_MODULES = ('layers.moe.gate', 'layers.moe.up', 'layers.moe.down')


def _peft_names(module: str, model_cfg) -> list[str]:
  """PEFT's module names for lm module `module`: one per row of its stack (its model layers)."""
  base = PEFT_PREFIX + _hf_module(module, model_cfg)
  layers = stack_lib.layer_rows(model_cfg, module)
  return [base] if layers is None else [base.format(i=i) for i in layers]


def _to_peft_experts(a_ELIr, b_ErO):
  """lm's per-expert A [E, in, r] and B [E, r, out] -> PEFT's lora_A [E·r, in] (row e·r + j) and
  lora_B [out, r·E] (column j·E + e)."""
  E, n_in, r = a_ELIr.shape
  return (np.ascontiguousarray(a_ELIr.transpose(0, 2, 1).reshape(E * r, n_in)),
          np.ascontiguousarray(b_ErO.transpose(2, 1, 0).reshape(b_ErO.shape[-1], r * E)))


def _expert_targets(family: str) -> tuple[str, str]:
  """PEFT's target_parameters of `family`'s gate_up_proj and down_proj: the experts' module below
  its layer (`mlp.experts.gate_up_proj`, Gemma 4's `experts.gate_up_proj`)."""
  module = EXPERTS[family].removeprefix(LAYER)
  return module + '.gate_up_proj', module + '.down_proj'


def _expert_tensors(adapter: dict, experts: list, model_cfg) -> tuple[dict, dict]:
  """(PEFT tensors, adapter_config fields) of the expert adapters."""
  family = _family(model_cfg)
  template, (gate_up, down) = EXPERTS[family], _expert_targets(family)
  lora = model_cfg.lora
  r = int(lora.rank)
  scale = lora.alpha / (math.sqrt(r) if lora.rslora else r)
  get = lambda m, kind: hf.host(adapter[f'{m}.{kind}']) if m in experts else None
  layers = stack_lib.layer_rows(model_cfg, experts[0])
  tensors, targets = {}, []
  both = ('layers.moe.down' in experts) and len(experts) > 1
  if {'layers.moe.gate', 'layers.moe.up'} & set(experts):
    ref = get(next(m for m in experts if m != 'layers.moe.down'), 'lora_a')
    a_gate, a_up = (get(m, 'lora_a') for m in ('layers.moe.gate', 'layers.moe.up'))
    b_gate, b_up = (get(m, 'lora_b') for m in ('layers.moe.gate', 'layers.moe.up'))
    L, E, D, _ = ref.shape
    F = (b_gate if b_gate is not None else b_up).shape[-1]
    zeros_a, zeros_b = np.zeros((L, E, D, r), ref.dtype), np.zeros((L, E, r, F), ref.dtype)
    a_cat = np.concatenate([zeros_a if a_gate is None else a_gate,
                            zeros_a if a_up is None else a_up], axis=-1)  # [L, E, D, 2r]
    b_cat = np.zeros((L, E, 2 * r, 2 * F), ref.dtype)  # block-diagonal: gate rows, then up
    if b_gate is not None:
      b_cat[:, :, :r, :F] = b_gate
    if b_up is not None:
      b_cat[:, :, r:, F:] = b_up
    wrapper = '.base_layer' if both else ''
    for row, i in enumerate(layers):
      name = PEFT_PREFIX + template.format(i=i) + wrapper
      tensors[name + '.lora_A.weight'], tensors[name + '.lora_B.weight'] = _to_peft_experts(
          a_cat[row], b_cat[row])
    targets.append(gate_up)
  if 'layers.moe.down' in experts:
    a, b = get('layers.moe.down', 'lora_a'), get('layers.moe.down', 'lora_b')
    for row, i in enumerate(layers):
      name = PEFT_PREFIX + template.format(i=i)
      tensors[name + '.lora_A.weight'], tensors[name + '.lora_B.weight'] = _to_peft_experts(
          a[row], b[row])
    targets.append(down)
  fields = {'target_parameters': targets, 'lora_dropout': 0.0}
  if gate_up in targets:  # rank 2r at the scale lm's rank-r adapters have
    fields.update(rank_pattern={gate_up: 2 * r},
                  alpha_pattern={gate_up: scale * (math.sqrt(2 * r) if lora.rslora else 2 * r)})
  return tensors, fields


def save_peft(path: str, params: dict, model_cfg, *, base_model: str = '') -> None:
  """The adapter entries of `params` as a PEFT LoRA directory."""
  _, adapter = split(params)
  if not adapter:
    raise CheckpointError('no LoRA adapters in these parameters (model.lora.rank is 0)')
  if model_cfg.get('hf_family') in hf.FUSED:
    raise CheckpointError(f'PEFT adapters for {model_cfg.hf_family} (fused qkv_proj and '
                          'gate_up_proj) are not supported; export the merged model instead')
  experts = [m for m in modules(adapter) if m in EXPERT_MODULES]
  others = [m for m in modules(adapter) if m not in EXPERT_MODULES]
  family = _family(model_cfg)
  if experts and family not in PEFT_EXPERT_FAMILIES:
    raise CheckpointError(f'PEFT export of LoRA on experts ({experts[0]}) is not supported for '
                          f'{family or "this model"}; merge them (lm export without '
                          "--adapters-only) or adapt only attention (model.lora.targets="
                          r"'layers\.attn\.')")
  mlp = [m for m in others if m.startswith(('layers.mlp.', 'layers.moe.shared.'))]
  if mlp and family in PEFT_MLP_AS_EXPERTS:
    raise CheckpointError(f'PEFT export of LoRA on {mlp[0]} is not supported for '
                          f'{family}: PEFT loads its gate_proj/up_proj/down_proj as '
                          "experts' weights and would drop these adapters; merge them (lm export "
                          r"without --adapters-only) or adapt only attention and experts (model.lora.targets='layers\.(attn|moe\.(gate|up|down))')")
  lora_cfg = model_cfg.lora
  tensors, config_extra = _expert_tensors(adapter, experts, model_cfg) if experts else ({}, {})
  for module in others:
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
      'target_modules': sorted({_hf_module(m, model_cfg).rsplit('.', 1)[-1] for m in others}),
      'bias': 'none',
      'fan_in_fan_out': False, 'modules_to_save': None, 'init_lora_weights': True,
      'inference_mode': True, 'use_dora': False, **config_extra}
  os.makedirs(path, exist_ok=True)
  if jax.process_index() == 0:
    write(os.path.join(path, 'adapter_model.safetensors'), tensors, {'format': 'pt'})
    with open(os.path.join(path, 'adapter_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)


# PEFT's target_parameters lm reads (any module path ending so: `mlp.experts.gate_up_proj`,
# Gemma 4's `experts.gate_up_proj`), and the lm modules each one holds.
EXPERT_PARAMETERS = {'experts.gate_up_proj': ('layers.moe.gate', 'layers.moe.up'),
                     'experts.down_proj': ('layers.moe.down',)}


def _pattern(patterns: dict, name: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first key
  that matches the end of `name` at a dot boundary."""
  for key, value in (patterns or {}).items():
    if re.match(rf'(.*\.)?({key})$', name):
      return value
  return default


def _scale(alpha: float, rank: int, rslora: bool) -> float:
  return alpha / (math.sqrt(rank) if rslora else rank)


def _expert_parameters(config: dict) -> list[str]:
  """The file's target_parameters as EXPERT_PARAMETERS keys; anything else is one line."""
  out = []
  for target in config.get('target_parameters') or []:
    known = [p for p in EXPERT_PARAMETERS if target == p or target.endswith('.' + p)]
    if not known:
      raise CheckpointError(f'PEFT adapter on parameter {target!r} cannot be read into lm; lm reads '
                            f'LoRA on {", ".join(EXPERT_PARAMETERS)} (experts)')
    out.append(known[0])
  return out


def lora_config_from_peft(config: dict) -> dict:
  """adapter_config.json -> lm `model.lora` fields (errors for what lm cannot represent). With
  per-module ranks or scales (rank_pattern, alpha_pattern) the rank is the largest and the scale
  the file's base one: load_peft pads and rescales the others to it."""
  if config.get('peft_type', 'LORA') != 'LORA':
    raise CheckpointError(f'peft_type {config.get("peft_type")!r} is not LoRA')
  for key, ok in (('use_dora', False), ('bias', 'none'), ('fan_in_fan_out', False)):
    if config.get(key, ok) not in (ok, None):
      raise CheckpointError(f'PEFT adapter with {key}={config[key]!r} is not supported')
  for key in ('layers_to_transform', 'modules_to_save'):
    if config.get(key):
      raise CheckpointError(f'PEFT adapter with {key} is not supported')
  experts = _expert_parameters(config)
  targets = config.get('target_modules') or []
  if targets == 'all-linear':
    chosen = [m for m in _ALL_MODULES if m != 'lm_head']
  elif isinstance(targets, str):
    chosen = [m for m, short in _HF_SHORT.items() if re.fullmatch(targets, _ALL_MODULES[m].format(i=0))
              or re.fullmatch(targets, short)]
  else:
    chosen = [m for m, short in _HF_SHORT.items() if short in targets]
  chosen += [m for p in experts for m in EXPERT_PARAMETERS[p]]
  if not chosen:
    raise CheckpointError(f'PEFT target_modules {targets!r} match no lm module')
  r, alpha = int(config['r']), float(config.get('lora_alpha', 8))
  rslora = bool(config.get('use_rslora', False))
  rank = max([r] + [int(v) for v in (config.get('rank_pattern') or {}).values()])
  if rank != r:  # the base scale at the larger rank
    alpha = _scale(alpha, r, rslora) * (math.sqrt(rank) if rslora else rank)
  return dict(rank=rank, alpha=alpha,
              dropout=float(config.get('lora_dropout', 0.0)), rslora=rslora,
              targets='^(' + '|'.join(re.escape(m) for m in chosen) + ')$')


def read_peft_config(path: str) -> dict:
  file = os.path.join(path, 'adapter_config.json')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has no adapter_config.json; not a PEFT adapter directory')
  return read_json(file, 'PEFT adapter config', CheckpointError)


class _Ranks:
  """Each adapted HF module's (rank, scale) in a PEFT file, against lm's one rank and scale."""

  def __init__(self, config: dict, lora_cfg):
    self.config, self.rank = config, int(lora_cfg.rank)
    self.r, self.alpha = int(config.get('r', self.rank)), float(config.get('lora_alpha', 8))
    self.rslora = bool(config.get('use_rslora', False))
    self.lm_scale = _scale(lora_cfg.alpha, self.rank, lora_cfg.rslora)

  def of(self, hf_module: str) -> tuple[int, float]:
    """(rank in the file, factor its B takes in lm) for HF module name `hf_module`."""
    r = int(_pattern(self.config.get('rank_pattern'), hf_module, self.r))
    alpha = float(_pattern(self.config.get('alpha_pattern'), hf_module, self.alpha))
    if r > self.rank:
      raise CheckpointError(f'PEFT adapter: {hf_module} has rank {r}, above model.lora.rank='
                            f'{self.rank}; read the config with lora_config_from_peft')
    return r, _scale(alpha, r, self.rslora) / self.lm_scale

  def of_layers(self, names: list[str]) -> tuple[int, float]:
    """One (rank, factor) for a stacked module's per-layer HF names (lm stacks one rank)."""
    found = {self.of(n) for n in names}
    if len(found) > 1:
      raise CheckpointError(f'PEFT adapter: {names[0]} and its other layers have different ranks '
                            'or scales; lm stacks one rank per module')
    return found.pop()


def _pad_rank(array, rank: int, axis: int):
  widths = [(0, 0)] * array.ndim
  widths[axis] = (0, rank - array.shape[axis])
  return np.pad(array, widths)


def _read_experts(reader, renamed, config, spec, ranks) -> tuple[dict, set]:
  """lm's expert adapters from PEFT's gate_up_proj / down_proj tensors (_expert_tensors undone),
  and the file names they used."""
  params = _expert_parameters(config)
  if not params:
    return {}, set()
  family = _family(spec.cfg)
  if family not in PEFT_EXPERT_FAMILIES:
    raise CheckpointError(f'PEFT adapter on experts cannot be read for {family or "this model"}; '
                          f'lm reads them for {", ".join(PEFT_EXPERT_FAMILIES)}')
  template = EXPERTS[family]
  layers = stack_lib.layer_rows(spec.cfg, 'layers.moe.gate') or range(spec.cfg.n_layers)
  R = ranks.rank
  out, used = {}, set()
  for param in params:
    # PEFT wraps gate_up_proj first: with both adapted its tensors sit under base_layer.
    wrapper = '.base_layer' if param.endswith('gate_up_proj') and len(params) > 1 else ''
    a_rows, b_rows = [], []
    for i in layers:
      name = PEFT_PREFIX + template.format(i=i) + wrapper
      a_name, b_name = name + '.lora_A.weight', name + '.lora_B.weight'
      for n in (a_name, b_name):
        if n not in renamed:
          raise CheckpointError(f'PEFT adapter: tensor {n!r} is missing ({param} of layer {i})')
      used.update(renamed[n] for n in (a_name, b_name))
      r, factor = ranks.of(template.format(i=i) + '.' + param.rsplit('.', 1)[-1])
      a, b = hf.host(reader.get(renamed[a_name])), hf.host(reader.get(renamed[b_name]))
      E = a.shape[0] // r
      if a.shape[0] != E * r or b.shape[1] != E * r:
        raise CheckpointError(f'PEFT adapter: {a_name} {a.shape} and {b_name} {b.shape} do not '
                              f'hold rank {r} per expert')
      a_rows.append(_pad_rank(a.reshape(E, r, -1).transpose(0, 2, 1), R, 2))  # [E, in, R]
      b_rows.append(_pad_rank(factor * b.reshape(-1, r, E).transpose(2, 1, 0), R, 1))  # [E, R, out]
    a_LEIR, b_LERO = np.stack(a_rows), np.stack(b_rows)
    if param.endswith('gate_up_proj'):
      F = b_LERO.shape[-1] // 2
      parts = {'layers.moe.gate': b_LERO[..., :F], 'layers.moe.up': b_LERO[..., F:]}
    else:
      parts = {'layers.moe.down': b_LERO}
    for module, b in parts.items():
      out[module + '.lora_a'], out[module + '.lora_b'] = a_LEIR, b
  return out, used


def load_peft(path: str, spec, shardings: dict | None = None) -> dict:
  """Adapter entries for `spec` (a ModelSpec whose lora config came from lora_config_from_peft)
  read from PEFT directory `path`, placed with `shardings` when given."""
  file = os.path.join(path, 'adapter_model.safetensors')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has no adapter_model.safetensors')
  config = read_peft_config(path)
  ranks = _Ranks(config, spec.cfg.lora)
  reader = Reader(file)
  # PEFT saves without the adapter name; files saved with it ('.lora_A.default.weight') also load.
  renamed = {re.sub(r'\.lora_([AB])\.[^.]+\.weight$', r'.lora_\1.weight', n): n for n in reader.names()}
  experts, used = _read_experts(reader, renamed, config, spec, ranks)
  plan, expected = {}, {}
  for name in spec.names:
    if not is_adapter(name) or name in experts:
      continue
    module, kind = name.rsplit('.', 1)
    if module in EXPERT_MODULES:
      raise CheckpointError(f'{file}: no PEFT target_parameters adapt {module} (lm parameter '
                            f'{name!r})')
    shape = spec.shapes[name].shape
    stacked = module.startswith('layers.')
    one = shape[1:] if stacked else shape
    layout = len(one) - 1 if kind == 'lora_a' else 1
    suffix = '.lora_A.weight' if kind == 'lora_a' else '.lora_B.weight'
    names = [n + suffix for n in _peft_names(module, spec.cfg)]
    r, factor = ranks.of_layers([n.removeprefix(PEFT_PREFIX).removesuffix(suffix) for n in names])
    rank_axis = len(one) - 1 if kind == 'lora_a' else 0
    one_r = tuple(r if a == rank_axis else d for a, d in enumerate(one))
    for n in names:
      if n not in renamed:
        raise CheckpointError(f'{file}: tensor {n!r} is missing (lm parameter {name!r})')
      expected[renamed[n]] = (hf.hf_shape(one_r, layout), name)
    plan[name] = (names, stacked, layout, one_r, r, factor if kind == 'lora_b' else 1.0)
  for n, (shape, lm_name) in expected.items():
    if tuple(reader.shape(n)) != tuple(shape):
      raise CheckpointError(f'{file}: tensor {n!r} has shape {tuple(reader.shape(n))}, expected '
                            f'{tuple(shape)} (lm parameter {lm_name!r}; is the rank right?)')
  extra = sorted(set(reader.names()) - set(expected) - used)
  if extra:
    raise CheckpointError(f'{file}: tensor {extra[0]!r} matches no adapted lm module')
  out = {}
  for name, (names, stacked, layout, one_r, r, factor) in plan.items():
    shape = spec.shapes[name].shape
    dtype = spec.shapes[name].dtype
    read_shape = (shape[0],) + one_r if stacked else one_r
    read = hf.read_stacked(_Renamed(reader, renamed), names, read_shape, layout, dtype, stacked)
    value = read((slice(None),) * len(read_shape))
    rank_axis = len(shape) - 1 if name.endswith('lora_a') else int(stacked)  # a [.., r], b [r, ..]
    out[name] = np.asarray(_pad_rank(value * factor, int(spec.cfg.lora.rank), rank_axis), dtype)
  out.update({n: np.asarray(v, spec.shapes[n].dtype) for n, v in experts.items()})
  for name, value in out.items():
    sharding = (shardings or {}).get(name) or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out[name] = jax.device_put(value, sharding)
  return out


class _Renamed:
  def __init__(self, reader, renamed):
    self.reader, self.renamed = reader, renamed

  def read(self, name, *args):
    return self.reader.read(self.renamed[name], *args)
