"""Hugging Face checkpoints in and out: Llama (2, 3.x), Mistral, Qwen2/2.5 and Gemma.

Import reads `config.json` for the model's shape and one or many `*.safetensors` shards, memory
mapped; each device's slice of each parameter is cut from the mapped tensors and put on that
device, so no process ever holds the whole model and no device a copy it does not own. Export
writes one parameter at a time into size-capped shards with an index, as `save_pretrained` does.

Layouts: HF linear weights are [out, in]; lm kernels are [*in, *out] with heads split out
(q [D, H, K], o [H, K, D]). RoPE is the same rotate-half layout on both sides, so q/k need only
reshapes, never a permutation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.config import head_dim, n_experts
from lm.errors import CheckpointError
from lm.io.safetensors import Reader, Writer

FAMILIES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
            'qwen2': 'Qwen2ForCausalLM', 'gemma': 'GemmaForCausalLM'}
MOE_FAMILIES = {'mixtral': 'MixtralForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM'}
FAMILIES.update(MOE_FAMILIES)
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers some old checkpoints saved

# lm module -> HF module ({i}: layer index). Parameters and LoRA adapters hang off these.
MODULES = {
    'layers.attn.q': 'model.layers.{i}.self_attn.q_proj',
    'layers.attn.k': 'model.layers.{i}.self_attn.k_proj',
    'layers.attn.v': 'model.layers.{i}.self_attn.v_proj',
    'layers.attn.o': 'model.layers.{i}.self_attn.o_proj',
    'layers.mlp.gate': 'model.layers.{i}.mlp.gate_proj',
    'layers.mlp.up': 'model.layers.{i}.mlp.up_proj',
    'layers.mlp.down': 'model.layers.{i}.mlp.down_proj',
    'lm_head': 'lm_head',
}
_IN_DIMS = {'layers.attn.o': 2}  # kernel dims that are inputs (o contracts heads and head_dim)
FLAT = -1  # a [H, K] bias stored flat [H * K]


# ----------------------------------------------------------------------------- configs


def _rope(hf: dict) -> tuple[float, dict | None]:
  params = dict(hf.get('rope_parameters') or {})
  legacy = hf.get('rope_scaling') or {}
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  scaling = {**legacy, **params}
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'default':
    return float(theta), None
  if kind == 'llama3':
    return float(theta), dict(factor=float(scaling['factor']),
                              low_freq_factor=float(scaling['low_freq_factor']),
                              high_freq_factor=float(scaling['high_freq_factor']),
                              original_max_seq_len=int(scaling['original_max_position_embeddings']))
  raise CheckpointError(f'rope type {kind!r} is not supported; lm implements default and llama3 RoPE')


def model_config_from_hf(hf: dict) -> dict:
  """A Hugging Face config.json (as a dict) -> lm `model` fields."""
  arch = (hf.get('architectures') or ['?'])[0]
  family = hf.get('model_type')
  if family not in FAMILIES or arch not in (FAMILIES[family], '?'):
    raise CheckpointError(f'unsupported architecture {arch} (model_type {family!r}); lm imports '
                          f'{", ".join(FAMILIES.values())}')
  for flag, what in (('mlp_bias', 'MLP biases'), ('use_sliding_window', 'per-layer sliding windows')):
    if hf.get(flag):
      raise CheckpointError(f'{arch} with {flag}=true ({what}) is not supported')
  if family == 'llama' and hf.get('attention_bias'):
    raise CheckpointError('LlamaForCausalLM with attention_bias=true (o_proj bias) is not supported')
  D, H = hf['hidden_size'], hf['num_attention_heads']
  K = hf.get('head_dim') or D // H
  theta, scaling = _rope(hf)
  activation = hf.get('hidden_activation') or hf.get('hidden_act', 'silu')
  activation = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu_tanh'}.get(activation)
  if activation is None or (activation == 'gelu_tanh') != (family == 'gemma'):
    raise CheckpointError(f'{arch} with activation {hf.get("hidden_act")!r} is not supported')
  gemma = family == 'gemma'
  moe = _moe_fields(hf, family)
  return dict(
      vocab_size=hf['vocab_size'], d_model=D, n_layers=hf['num_hidden_layers'], n_heads=H,
      n_kv_heads=hf.get('num_key_value_heads') or H, head_dim=0 if K == D // H else K,
      mlp_dim=hf['intermediate_size'], max_seq_len=hf.get('max_position_embeddings', 2048),
      rope_theta=theta, rope_scaling=scaling, qkv_bias=family == 'qwen2',
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), norm_offset=1.0 if gemma else 0.0,
      embed_scale=gemma, mlp_activation=activation,
      sliding_window=int(hf.get('sliding_window') or 0) if family in ('mistral', 'mixtral') else 0,
      **moe)


def _moe_fields(hf: dict, family: str) -> dict:
  """Mixtral / Qwen3-MoE config.json -> lm `model.moe` (and qk_norm) fields; {} for dense families."""
  if family not in MOE_FAMILIES:
    return {}
  n_experts = hf.get('num_local_experts') or hf.get('num_experts')
  moe = dict(n_experts=int(n_experts), experts_per_token=int(hf['num_experts_per_tok']))
  if family == 'mixtral':
    return dict(moe=dict(moe, expert_dim=hf['intermediate_size'], norm_topk_prob=True))
  step, dense_layers = hf.get('decoder_sparse_step', 1), hf.get('mlp_only_layers') or []
  if step != 1 or dense_layers:
    raise CheckpointError(f'Qwen3MoeForCausalLM with decoder_sparse_step={step}, mlp_only_layers='
                          f'{dense_layers} (dense MLP layers among the MoE ones) is not supported; '
                          'lm supports experts in every layer (decoder_sparse_step=1, mlp_only_layers=[])')
  if hf.get('attention_bias'):
    raise CheckpointError('Qwen3MoeForCausalLM with attention_bias=true is not supported')
  return dict(qk_norm=True, moe=dict(moe, expert_dim=hf['moe_intermediate_size'],
                                     norm_topk_prob=bool(hf.get('norm_topk_prob', False))))


def _moe_family(m) -> str:
  if m.qk_norm:
    return 'qwen3_moe'
  if not m.moe.norm_topk_prob:
    raise CheckpointError('no Hugging Face architecture matches this model: experts without q/k '
                          'norm are Mixtral, which always sets model.moe.norm_topk_prob=true')
  return 'mixtral'


def family_of(m) -> str:
  """The HF architecture that computes the same function as lm model config `m`."""
  if n_experts(m):
    return _moe_family(m)
  gemma = (m.norm_offset == 1.0, bool(m.embed_scale), m.mlp_activation == 'gelu_tanh')
  if any(gemma):
    if not all(gemma) or m.qkv_bias or m.sliding_window or not m.tie_embeddings:
      raise CheckpointError('no Hugging Face architecture matches this model: Gemma needs '
                            'norm_offset=1, embed_scale, gelu_tanh, tied embeddings, no biases')
    return 'gemma'
  if m.norm_offset != 0.0:
    raise CheckpointError(f'model.norm_offset={m.norm_offset} has no Hugging Face equivalent')
  if m.qkv_bias:
    if m.sliding_window:
      raise CheckpointError('q/k/v biases with a sliding window match no supported HF architecture')
    return 'qwen2'
  return 'mistral' if m.sliding_window else 'llama'


def hf_config(m, *, dtype: str = 'float32', family: str | None = None, **extra) -> dict:
  """lm model config -> a config.json dict that transformers loads."""
  family = family or family_of(m)
  K = head_dim(m)
  out = dict(
      architectures=[FAMILIES[family]], model_type=family, vocab_size=m.vocab_size,
      hidden_size=m.d_model, intermediate_size=m.mlp_dim, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=K,
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
      tie_word_embeddings=bool(m.tie_embeddings), torch_dtype=dtype,
      hidden_act='gelu_pytorch_tanh' if family == 'gemma' else 'silu', attention_dropout=0.0)
  if m.rope_scaling:
    s = m.rope_scaling
    out['rope_scaling'] = dict(rope_type='llama3', factor=s['factor'],
                               low_freq_factor=s['low_freq_factor'],
                               high_freq_factor=s['high_freq_factor'],
                               original_max_position_embeddings=s['original_max_seq_len'])
  if family == 'llama':
    out.update(attention_bias=False, mlp_bias=False)
  if family == 'mistral':
    out['sliding_window'] = m.sliding_window or None
  if family == 'qwen2':
    out.update(use_sliding_window=False, sliding_window=None)
  if family == 'gemma':
    out['hidden_activation'] = 'gelu_pytorch_tanh'
  out.update(_moe_hf_config(m, family))
  out.update(extra)
  return out


def _moe_hf_config(m, family: str) -> dict:
  if family not in MOE_FAMILIES:
    return {}
  F = m.moe.expert_dim or m.mlp_dim
  out = dict(num_local_experts=m.moe.n_experts, num_experts_per_tok=m.moe.experts_per_token,
             router_aux_loss_coef=m.moe.aux_loss_weight, output_router_logits=False)
  if family == 'mixtral':
    return dict(out, intermediate_size=F, sliding_window=m.sliding_window or None)
  return dict(out, num_experts=m.moe.n_experts, moe_intermediate_size=F,
              norm_topk_prob=bool(m.moe.norm_topk_prob), decoder_sparse_step=1, mlp_only_layers=[],
              attention_bias=False, use_sliding_window=False, sliding_window=None)


def read_config(path: str) -> dict:
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has no config.json; a Hugging Face model directory holds '
                          'config.json and *.safetensors')
  with open(file, encoding='utf-8') as f:
    return json.load(f)


# ----------------------------------------------------------------------------- layouts


def param_map(spec_shapes: dict, family: str | None = None) -> dict[str, tuple[str, int]]:
  """{lm parameter: (HF tensor name with {i} for stacked layers, layout)} for base weights.

  layout: n > 0 for a kernel [*in (n dims), *out] stored as [prod(out), prod(in)]; 0 for the
  same array; FLAT for a [H, K] bias stored as [H * K].
  """
  out = {'embed': ('model.embed_tokens.weight', 0), 'final_norm.scale': ('model.norm.weight', 0),
         'layers.attn_norm.scale': ('model.layers.{i}.input_layernorm.weight', 0),
         'layers.mlp_norm.scale': ('model.layers.{i}.post_attention_layernorm.weight', 0)}
  for module, hf_module in MODULES.items():
    out[module + '.kernel'] = (hf_module + '.weight', _IN_DIMS.get(module, 1))
    out[module + '.bias'] = (hf_module + '.bias', FLAT)
  out.update(QK_NORMS)
  if 'layers.mlp.router' in spec_shapes:
    out.update(expert_param_map(family))
  return {k: v for k, v in out.items() if k in spec_shapes}


QK_NORMS = {'layers.attn.q_norm.scale': ('model.layers.{i}.self_attn.q_norm.weight', 0),
            'layers.attn.k_norm.scale': ('model.layers.{i}.self_attn.k_norm.weight', 0)}
# lm expert module -> HF module per family ({e}: expert index); the router is `<moe>.gate`.
EXPERT_MODULES = {
    'mixtral': ('model.layers.{i}.block_sparse_moe',
                {'layers.mlp.gate': 'experts.{e}.w1', 'layers.mlp.up': 'experts.{e}.w3',
                 'layers.mlp.down': 'experts.{e}.w2'}),
    'qwen3_moe': ('model.layers.{i}.mlp',
                  {'layers.mlp.gate': 'experts.{e}.gate_proj', 'layers.mlp.up': 'experts.{e}.up_proj',
                   'layers.mlp.down': 'experts.{e}.down_proj'}),
}


def expert_param_map(family: str) -> dict[str, tuple[str, int]]:
  """{lm parameter: (HF tensor name with {i} and {e}, layout)} for a Mixture-of-Experts family:
  expert kernels [L, E, in, out] are one HF [out, in] tensor per layer and expert."""
  if family not in EXPERT_MODULES:
    raise CheckpointError(f'a model with experts exports as {" or ".join(MOE_FAMILIES.values())}, '
                          f'not as {family!r}')
  prefix, experts = EXPERT_MODULES[family]
  out = {'layers.mlp.router': (prefix + '.gate.weight', 1)}
  out.update({m + '.kernel': (f'{prefix}.{hf_m}.weight', 1) for m, hf_m in experts.items()})
  return out


def stacked_dims(name: str, template: str) -> int:
  """Leading dims of lm parameter `name` that index separate HF tensors: layers, then experts."""
  return int(name.startswith('layers.')) + int('{e}' in template)


def to_lm(hf_array, shape, layout):
  """A view of an HF tensor in lm's per-layer layout (no copy: transposes of a memory map)."""
  if layout <= 0:
    return hf_array.reshape(shape)
  ins, outs = shape[:layout], shape[layout:]
  view = hf_array.reshape(*outs, *ins)
  return view.transpose(*range(len(outs), len(shape)), *range(len(outs)))


def to_hf(array, layout):
  if layout == FLAT:
    return array.reshape(-1)
  if layout == 0:
    return array
  ins, outs = array.shape[:layout], array.shape[layout:]
  moved = array.transpose(*range(layout, array.ndim), *range(layout))
  return moved.reshape(math.prod(outs), math.prod(ins))


def hf_shape(shape, layout) -> tuple:
  if layout == FLAT:
    return (math.prod(shape),)
  if layout == 0:
    return tuple(shape)
  return (math.prod(shape[layout:]), math.prod(shape[:layout]))


def _hf_names(template: str, stacked_layers: int | None, experts: int | None = None) -> list[str]:
  if experts is not None:  # layer-major, as the lm array [L, E, ...] is laid out
    return [template.format(i=i, e=e) for i in range(stacked_layers) for e in range(experts)]
  return [template] if stacked_layers is None else [template.format(i=i) for i in range(stacked_layers)]


# ----------------------------------------------------------------------------- import


def place(shape, sharding, read):
  """A global array from `read(index) -> np.ndarray` for each distinct device slice: each slice
  is read once and put only on the devices that hold it."""
  groups = {}
  for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
    key = tuple((s.start, s.stop, s.step) for s in index)
    groups.setdefault(key, (index, []))[1].append(device)
  arrays = []
  for index, devices in groups.values():
    host = read(index)
    arrays.extend(jax.device_put(host, d) for d in devices)
  return jax.make_array_from_single_device_arrays(tuple(shape), sharding, arrays)


def read_stacked(reader, names, shape, layout, dtype, stacked):
  """read(index) for one lm parameter whose HF tensors are `names` (one per layer if stacked;
  stacked=2: one per layer and expert, layer-major)."""
  n = int(stacked)
  def read(index):
    if not n:
      return np.asarray(to_lm(reader.get(names[0]), shape, layout)[index], dtype)
    grid = np.arange(math.prod(shape[:n])).reshape(shape[:n])[tuple(index[:n])]
    parts = [np.asarray(to_lm(reader.get(names[j]), shape[n:], layout)[tuple(index[n:])], dtype)
             for j in grid.reshape(-1)]
    return np.stack(parts).reshape(*grid.shape, *parts[0].shape)
  return read


def check_tensors(reader, expected: dict, source: str, tied: bool) -> None:
  """expected: {HF name: (shape, lm name)}. Errors name the first offending tensor."""
  for name, (shape, lm_name) in expected.items():
    if name not in reader:
      raise CheckpointError(f'{source}: tensor {name!r} is missing (needed for lm parameter '
                            f'{lm_name!r}); the directory must hold the whole model its '
                            'config.json describes')
    if tuple(reader.shape(name)) != tuple(shape):
      raise CheckpointError(f'{source}: tensor {name!r} has shape {tuple(reader.shape(name))}, but '
                            f'the config implies {tuple(shape)} (lm parameter {lm_name!r})')
  unknown = [n for n in reader.names() if n not in expected and not n.endswith(IGNORED_SUFFIXES)
             and not (tied and n == 'lm_head.weight')]
  if unknown:
    raise CheckpointError(f'{source}: tensor {unknown[0]!r} has no place in this model '
                          f'({len(unknown)} unknown tensors; an unsupported architecture variant?)')


def load_params(path: str, spec, shardings: dict) -> dict:
  """The base weights of HF directory `path` as {lm name: array} placed with `shardings`."""
  reader = Reader(path)
  moe = n_experts(spec.cfg)
  table = param_map(spec.shapes, family_of(spec.cfg) if moe else None)
  L = spec.cfg.n_layers
  expected, plan = {}, {}
  for name, (template, layout) in table.items():
    shape = spec.shapes[name].shape
    stacked = stacked_dims(name, template)
    names = _hf_names(template, L if stacked else None, moe if stacked == 2 else None)
    one = hf_shape(shape[stacked:], layout)
    expected.update({n: (one, name) for n in names})
    plan[name] = (names, stacked, layout)
  check_tensors(reader, expected, path, spec.cfg.tie_embeddings)
  params = {}
  for name, (names, stacked, layout) in plan.items():
    shape, dtype = spec.shapes[name].shape, spec.shapes[name].dtype
    params[name] = place(shape, shardings[name],
                         read_stacked(reader, names, shape, layout, dtype, stacked))
  return params


# ----------------------------------------------------------------------------- export


def host(array) -> np.ndarray:
  """The whole array on this host (gathered across processes when it spans several)."""
  if getattr(array, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def write_sharded(path: str, tensors: list, fetch, *, prefix: str = 'model',
                  max_shard_bytes: int = 2 ** 31) -> list[str]:
  """Writes tensors [(HF name, shape, dtype, (key, index))] where fetch(key) gives an array and
  index selects the tensor in it; one key is fetched at a time. Returns the files written."""
  shards, size = [[]], 0
  for t in tensors:
    nbytes = math.prod(t[1]) * np.dtype(t[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += nbytes
  files = ([f'{prefix}.safetensors'] if len(shards) == 1 else
           [f'{prefix}-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))])
  cache = {}
  is_main = jax.process_index() == 0
  for file, shard in zip(files, shards):
    layout = {name: (dtype, shape) for name, shape, dtype, _ in shard}
    with (Writer(os.path.join(path, file), layout, {'format': 'pt'}) if is_main
          else contextlib.nullcontext()) as writer:
      for name, _, dtype, (key, index) in shard:
        if key not in cache:
          cache.clear()  # one source array in memory at a time
          cache[key] = fetch(key)  # every process takes part in gathering it
        if writer:
          value = cache[key] if index is None else cache[key][index]
          writer.add(name, np.ascontiguousarray(value, dtype))
  if len(files) > 1 and is_main:
    weight_map = {t[0]: f for f, shard in zip(files, shards) for t in shard}
    total = sum(math.prod(t[1]) * np.dtype(t[2]).itemsize for t in tensors)
    with open(os.path.join(path, f'{prefix}.safetensors.index.json'), 'w', encoding='utf-8') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
  return files


def save(path: str, params: dict, model_cfg, *, dtype: str = 'float32', family: str | None = None,
         max_shard_bytes: int = 2 ** 31, **config_extra) -> None:
  """Writes base weights `params` (flat lm names) as a Hugging Face model directory."""
  config = hf_config(model_cfg, dtype=dtype, family=family, **config_extra)
  os.makedirs(path, exist_ok=True)
  table = param_map(params, config['model_type'])
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  tensors = []
  for name, (template, layout) in table.items():
    shape = params[name].shape
    stacked = stacked_dims(name, template)
    if stacked == 2:
      tensors += [(template.format(i=i, e=e), hf_shape(shape[2:], layout), np_dtype, (name, (i, e)))
                  for i in range(shape[0]) for e in range(shape[1])]
    elif stacked:
      tensors += [(template.format(i=i), hf_shape(shape[1:], layout), np_dtype, (name, i))
                  for i in range(shape[0])]
    else:
      tensors.append((template, hf_shape(shape, layout), np_dtype, (name, None)))
  layouts = {name: (layout, stacked_dims(name, template)) for name, (template, layout) in table.items()}

  def fetch(name):
    array = host(params[name])
    layout, stacked = layouts[name]
    if stacked:
      flat = array.reshape(-1, *array.shape[stacked:])
      return np.stack([to_hf(a, layout) for a in flat]).reshape(
          *array.shape[:stacked], *hf_shape(array.shape[stacked:], layout))
    return to_hf(array, layout)

  write_sharded(path, tensors, fetch, max_shard_bytes=max_shard_bytes)
  if jax.process_index() == 0:
    with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)
