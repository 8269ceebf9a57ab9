"""Hugging Face checkpoints in and out: Llama (2, 3.x), Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3
(text) and Phi-3/Phi-4.

Import reads `config.json` for the model's shape and one or many `*.safetensors` shards, memory
mapped; each device's slice of each parameter is cut from the mapped tensors and put on that
device, so no process ever holds the whole model and no device a copy it does not own. Export
writes one parameter at a time into size-capped shards with an index, as `save_pretrained` does.

Layouts: HF linear weights are [out, in]; lm kernels are [*in, *out] with heads split out
(q [D, H, K], o [H, K, D]). RoPE is the same rotate-half layout on both sides, so q/k need only
reshapes, never a permutation. Phi-3's fused qkv_proj and gate_up_proj are split on import
and concatenated again on export.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.config import ROPE_SCALING_TYPES, head_dim, mla_enabled, n_experts
from lm.errors import CheckpointError, ConfigError, read_json
from lm.io.families.common import (FLAT, IN_DIMS, LAYER_TYPES, MODULES, ROPE_TYPES, hf_rope_scaling,
                                     rope_from_hf, rope_params)
from lm.io import mxfp4
from lm.io.families import REGISTRY, gemma4
from lm.io.families.common import Custom
from lm.io.safetensors import Reader, Writer
from lm.model import stack as stack_lib

# model_type -> architecture. Phi-3 computes what Llama/Mistral do; only its file layout differs.
FAMILIES = {'llama': 'LlamaForCausalLM', 'mistral': 'MistralForCausalLM',
            'qwen2': 'Qwen2ForCausalLM', 'qwen3': 'Qwen3ForCausalLM', 'gemma': 'GemmaForCausalLM',
            'gemma2': 'Gemma2ForCausalLM', 'gemma3_text': 'Gemma3ForCausalLM',
            'phi3': 'Phi3ForCausalLM'}
MOE_FAMILIES = {'mixtral': 'MixtralForCausalLM', 'qwen3_moe': 'Qwen3MoeForCausalLM'}
FAMILIES.update(MOE_FAMILIES)
GEMMAS = ('gemma', 'gemma2', 'gemma3_text')
ATTENTION_BIAS = ('llama', 'qwen3', 'gemma2', 'gemma3_text')  # attention_bias: q, k, v and o
SLIDING = ('mistral', 'mixtral', 'phi3', 'gemma2', 'gemma3_text')
QK_NORM = ('qwen3', 'qwen3_moe', 'gemma3_text')
IGNORED_SUFFIXES = ('rotary_emb.inv_freq',)  # buffers some old checkpoints saved

# Phi-3 stores q/k/v as one qkv_proj and gate/up as one gate_up_proj: module -> (fused, part).
FUSED = {'phi3': {'layers.attn.q': ('model.layers.{i}.self_attn.qkv_proj', 0),
                  'layers.attn.k': ('model.layers.{i}.self_attn.qkv_proj', 1),
                  'layers.attn.v': ('model.layers.{i}.self_attn.qkv_proj', 2),
                  'layers.mlp.gate': ('model.layers.{i}.mlp.gate_up_proj', 0),
                  'layers.mlp.up': ('model.layers.{i}.mlp.gate_up_proj', 1)}}


# ----------------------------------------------------------------------------- configs


def _layer_types(hf: dict, family: str, n_layers: int) -> tuple[str, ...]:
  """Per-layer 'sliding' / 'full' as transformers derives them."""
  if hf.get('layer_types'):
    attention = {k: v for k, v in LAYER_TYPES.items() if v in ('sliding', 'full')}
    unknown = sorted(set(hf['layer_types']) - set(attention))
    if unknown:
      raise CheckpointError(f'layer type {unknown[0]!r} is not supported in {family}; lm '
                            f'implements {", ".join(attention)} there')
    return tuple(attention[t] for t in hf['layer_types'])
  if family == 'gemma2':
    return tuple('sliding' if (i + 1) % 2 else 'full' for i in range(n_layers))
  if family == 'gemma3_text':
    pattern = hf.get('sliding_window_pattern', 6)
    return tuple('sliding' if (i + 1) % pattern else 'full' for i in range(n_layers))
  if family in SLIDING and hf.get('sliding_window'):
    return ('sliding',) * n_layers
  return ('full',) * n_layers


REQUIRED_KEYS = ('hidden_size', 'num_attention_heads', 'num_hidden_layers', 'intermediate_size',
                 'vocab_size')


def _check_required(hf: dict) -> None:
  lacking = [k for k in REQUIRED_KEYS if not isinstance(hf.get(k), int) or hf[k] < 1]
  if lacking:
    raise CheckpointError(f'the Hugging Face config.json lacks a positive integer {lacking[0]!r}'
                          + (f' (and {len(lacking) - 1} more)' if len(lacking) > 1 else '')
                          + '; restore the model\'s own config.json')


def model_config_from_hf(hf: dict) -> dict:
  """A Hugging Face config.json (as a dict) -> lm `model` fields."""
  arch = (hf.get('architectures') or ['?'])[0]
  family = hf.get('model_type')
  known = {**FAMILIES, **{f: entry.architecture for f, entry in REGISTRY.items()}}
  if family not in known or arch not in (known[family], '?'):
    raise CheckpointError(f'unsupported architecture {arch} (model_type {family!r}); lm imports '
                          f'{", ".join(known.values())}')
  if family in REGISTRY:
    _check_required(hf)
    return REGISTRY[family].to_lm(hf)
  if hf.get('mlp_bias') and family != 'llama':
    raise CheckpointError(f'{arch} with mlp_bias=true (MLP biases) is not supported')
  if hf.get('use_sliding_window'):
    raise CheckpointError(f'{arch} with use_sliding_window=true (sliding windows from '
                          'max_window_layers on) is not supported')
  if hf.get('use_bidirectional_attention'):
    raise CheckpointError(f'{arch} with use_bidirectional_attention=true is not supported')
  _check_required(hf)
  gemma = family in GEMMAS
  D, H, L = hf['hidden_size'], hf['num_attention_heads'], hf['num_hidden_layers']
  K = hf.get('head_dim') or D // H
  full_rope, local_rope = rope_params(hf)
  if full_rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) != 1.0:
    raise CheckpointError(f'{arch} with partial_rotary_factor != 1 (RoPE on part of each head) is '
                          'not supported')
  theta, scaling = rope_from_hf(full_rope, hf)
  local_theta = 0.0
  if local_rope:
    local_theta, local_scaling = rope_from_hf(local_rope, hf)
    if local_scaling:
      raise CheckpointError(f'{arch} with RoPE scaling on sliding layers is not supported')
  activation = hf.get('hidden_activation') or hf.get('hidden_act') or (
      'gelu_pytorch_tanh' if gemma else 'silu')
  activation = {'silu': 'silu', 'gelu_pytorch_tanh': 'gelu_tanh', 'gelu': 'gelu_tanh'}.get(activation)
  if activation is None or (activation == 'gelu_tanh') != gemma:
    raise CheckpointError(f'{arch} with activation {hf.get("hidden_act")!r} is not supported')
  kinds = _layer_types(hf, family, L) if family in SLIDING else ('full',) * L
  window = int(hf.get('sliding_window') or 0) if 'sliding' in kinds else 0
  attention_bias = bool(hf.get('attention_bias')) and family in ATTENTION_BIAS
  fields = dict(
      vocab_size=hf['vocab_size'], d_model=D, n_layers=L, n_heads=H,
      n_kv_heads=hf.get('num_key_value_heads') or H, head_dim=0 if K == D // H else K,
      mlp_dim=hf['intermediate_size'], max_seq_len=hf.get('max_position_embeddings', 2048),
      rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
      qkv_bias=family == 'qwen2' or attention_bias, attn_out_bias=attention_bias,
      mlp_bias=bool(hf.get('mlp_bias')),
      tie_embeddings=bool(hf.get('tie_word_embeddings', gemma)),
      norm_eps=float(hf.get('rms_norm_eps', 1e-6)), norm_offset=1.0 if gemma else 0.0,
      embed_scale=gemma, mlp_activation=activation, sliding_window=window,
      layer_types=kinds if len(set(kinds)) > 1 else (),
      qk_norm=family in QK_NORM,
      norm_placement='sandwich' if family in ('gemma2', 'gemma3_text') else 'pre',
      hf_family=family)
  fields.update(_moe_fields(hf, family))
  if family in ('gemma2', 'gemma3_text'):
    defaults = (50.0, 30.0) if family == 'gemma2' else (None, None)
    fields.update(
        query_pre_attn_scalar=float(hf.get('query_pre_attn_scalar', 256)),
        # Gemma 3's attention ignores attn_logit_softcapping (transformers never passes it on).
        attn_logit_softcap=float(hf.get('attn_logit_softcapping', defaults[0]) or 0.0)
        if family == 'gemma2' else 0.0,
        final_logit_softcap=float(hf.get('final_logit_softcapping', defaults[1]) or 0.0))
  return fields


def _moe_fields(hf: dict, family: str) -> dict:
  """Mixtral / Qwen3-MoE config.json -> lm `model.moe` fields; {} for dense families."""
  if family not in MOE_FAMILIES:
    return {}
  n_experts = hf.get('num_local_experts') or hf.get('num_experts')
  moe = dict(n_experts=int(n_experts), experts_per_token=int(hf['num_experts_per_tok']))
  if family == 'mixtral':
    return dict(moe=dict(moe, expert_dim=hf['intermediate_size'], norm_topk_prob=True))
  # Dense MLP layers among the MoE ones, as transformers places them: a layer has experts when
  # it is not in mlp_only_layers and (i + 1) is a multiple of decoder_sparse_step.
  step, dense_layers = int(hf.get('decoder_sparse_step', 1) or 1), set(hf.get('mlp_only_layers') or [])
  kinds = tuple('moe' if i not in dense_layers and (i + 1) % step == 0 else 'dense'
                for i in range(hf['num_hidden_layers']))
  mlp_types = {} if set(kinds) == {'moe'} else dict(mlp_types=kinds)
  if hf.get('attention_bias'):
    raise CheckpointError('Qwen3MoeForCausalLM with attention_bias=true is not supported')
  return dict(moe=dict(moe, expert_dim=hf['moe_intermediate_size'],
                      norm_topk_prob=bool(hf.get('norm_topk_prob', False))), **mlp_types)


def _moe_family(m) -> str:
  if m.qk_norm:
    return 'qwen3_moe'
  if not m.moe.norm_topk_prob:
    raise CheckpointError('no Hugging Face architecture matches this model: experts without q/k '
                          'norm are Mixtral, which always sets model.moe.norm_topk_prob=true')
  return 'mixtral'


def _unfit(m, family: str) -> str | None:
  """The first model field whose value HF `family` cannot express, or None when it fits."""
  gemma = family in GEMMAS
  both_biases = family in ATTENTION_BIAS and m.qkv_bias == m.attn_out_bias
  fits = {
      'norm_offset': m.norm_offset == (1.0 if gemma else 0.0),
      'embed_scale': bool(m.embed_scale) == gemma,
      'mlp_activation': (m.mlp_activation == 'gelu_tanh') == gemma,
      'qk_norm': bool(m.qk_norm) == (family in QK_NORM),
      'norm_placement': m.norm_placement == ('sandwich' if family in ('gemma2', 'gemma3_text')
                                             else 'pre'),
      'qkv_bias': m.qkv_bias if family == 'qwen2' else (not m.qkv_bias or both_biases),
      'attn_out_bias': not m.attn_out_bias or both_biases,
      'mlp_bias': not m.mlp_bias or family == 'llama',
      'sliding_window': not m.sliding_window or family in SLIDING,
      # Mixed layers only as Gemma 2/3 write them (layer_types), and only window or full ones.
      'layer_types': (not m.layer_types or family in ('gemma2', 'gemma3_text'))
                     and set(m.layer_types) <= {'sliding', 'full'},
      'rope_local_theta': not m.rope_local_theta or family == 'gemma3_text',
      'rope_scaling': not m.rope_scaling or family != 'phi3',  # transformers turns it into longrope
      'query_pre_attn_scalar': not m.query_pre_attn_scalar or family in ('gemma2', 'gemma3_text'),
      'attn_logit_softcap': not m.attn_logit_softcap or family == 'gemma2',
      'final_logit_softcap': not m.final_logit_softcap or family in ('gemma2', 'gemma3_text'),
      # What only the families in lm/io/families/ have.
      'mlp_types': not m.mlp_types or family == 'qwen3_moe', 'rope_layers': not m.rope_layers or all(m.rope_layers),
      'partial_rotary_factor': m.partial_rotary_factor == 1.0,
      'attn_output_gate': not m.attn_output_gate, 'qk_norm_scope': m.qk_norm_scope == 'head',
      'mla': not mla_enabled(m),
      # Mixtral and Qwen3-MoE route by softmax, with no shared expert and no biases.
      **({} if not n_experts(m) else {
          'moe.router': m.moe.get('router', 'softmax') == 'softmax',
          'moe.shared_dim': not m.moe.get('shared_dim'), 'moe.router_bias': not m.moe.get('router_bias'),
          'moe.expert_bias': not m.moe.get('expert_bias'),
          'moe.swiglu_limit': not m.moe.get('swiglu_limit'),
          'moe.routed_scaling_factor': m.moe.get('routed_scaling_factor', 1.0) == 1.0}),
  }
  return next((field for field, ok in fits.items() if not ok), None)


def family_of(m) -> str:
  """The HF model_type that computes the same function as lm model config `m`: the one it was
  imported from (`hf_family`), else the first that can express every field."""
  family = _family_of(m)
  field = gemma4.own_field(m)
  if field and family != gemma4.FAMILY_NAME:  # the other tables do not look at Gemma 4's fields
    raise CheckpointError(f'{family} cannot express model.{field}={m[field]!r} (Gemma 4 only); '
                          f'set model.hf_family={gemma4.FAMILY_NAME!r} or drop it')
  return family


def _family_of(m) -> str:
  family = m.get('hf_family') or ''
  moe = bool(n_experts(m))
  if family in REGISTRY:
    field = REGISTRY[family].unfit(m)
    if field:
      raise CheckpointError(f'model.hf_family={family!r} cannot express model.{field}='
                            f'{m[field]!r}; change one of them')
    return family
  if family:
    if family not in FAMILIES:
      raise CheckpointError(f'model.hf_family={family!r} is not one lm exports; choose one of '
                            f'{", ".join(FAMILIES)}')
    if moe != (family in MOE_FAMILIES):
      raise CheckpointError(f'model.hf_family={family!r} does not match model.moe.n_experts='
                            f'{n_experts(m)}; experts export as {" or ".join(MOE_FAMILIES)}')
    field = _unfit(m, family)
    if field:
      raise CheckpointError(f'model.hf_family={family!r} cannot express model.{field}='
                            f'{m[field]!r}; change one of them')
    return family
  if moe:
    family = _moe_family(m)
    field = _unfit(m, family)
    if field:
      raise CheckpointError(f'no supported HF architecture can express this model ('
                            f'{MOE_FAMILIES[family]} cannot express model.{field}={m[field]!r})')
    return family
  for family in FAMILIES:
    if family != 'phi3' and family not in MOE_FAMILIES and _unfit(m, family) is None:
      return family
  for family, entry in REGISTRY.items():
    if entry.unfit(m) is None:
      return family
  field = _unfit(m, 'llama')
  raise CheckpointError(f'no supported HF architecture can express this model (Llama cannot '
                        f'express model.{field}={m[field]!r}); lm exports '
                        f'{", ".join(FAMILIES.values())}')


def hf_config(m, *, dtype: str = 'float32', family: str | None = None, **extra) -> dict:
  """lm model config -> a config.json dict that transformers loads."""
  family = family or family_of(m)
  if family in REGISTRY:
    return {**REGISTRY[family].to_hf(m), 'torch_dtype': dtype, **extra}
  K = head_dim(m)
  gemma = family in GEMMAS
  out = dict(
      architectures=[FAMILIES[family]], model_type=family, vocab_size=m.vocab_size,
      hidden_size=m.d_model, intermediate_size=m.mlp_dim, num_hidden_layers=m.n_layers,
      num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=K,
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
      tie_word_embeddings=bool(m.tie_embeddings), torch_dtype=dtype,
      hidden_act='gelu_pytorch_tanh' if gemma else 'silu', attention_dropout=0.0)
  rope_scaling = hf_rope_scaling(m.rope_scaling) if m.rope_scaling else None
  if rope_scaling:
    out['rope_scaling'] = rope_scaling
  if family in ATTENTION_BIAS:
    out['attention_bias'] = bool(m.qkv_bias)
  if family == 'llama':
    out['mlp_bias'] = bool(m.mlp_bias)
  if family in ('mistral', 'phi3'):
    out['sliding_window'] = m.sliding_window or None
  if family in ('qwen2', 'qwen3'):
    out.update(use_sliding_window=False, sliding_window=None)
  if family == 'phi3':  # Phi3Config's default pad id (32000) only fits Phi-3's own vocabulary
    out.update(original_max_position_embeddings=m.max_seq_len, partial_rotary_factor=1.0,
               pad_token_id=None)
  if gemma:
    out['hidden_activation'] = 'gelu_pytorch_tanh'
  if family in ('gemma2', 'gemma3_text'):
    kinds = tuple(m.layer_types) or ('sliding' if m.sliding_window else 'full',) * m.n_layers
    names = {kind: hf_name for hf_name, kind in LAYER_TYPES.items()}
    scalar = m.query_pre_attn_scalar or K
    out.update(query_pre_attn_scalar=int(scalar) if float(scalar).is_integer() else scalar,
               attn_logit_softcapping=m.attn_logit_softcap or None,
               final_logit_softcapping=m.final_logit_softcap or None,
               sliding_window=m.sliding_window or m.max_seq_len,
               layer_types=[names[kind] for kind in kinds])
  if family == 'gemma3_text':
    local = m.rope_local_theta or m.rope_theta
    out['rope_local_base_freq'] = local
    out['rope_parameters'] = {
        'full_attention': {'rope_type': 'default', 'rope_theta': m.rope_theta, **(rope_scaling or {})},
        'sliding_attention': {'rope_type': 'default', 'rope_theta': local}}
    if not m.rope_local_theta and rope_scaling:  # sliding layers share the full layers' scaling
      out['rope_parameters']['sliding_attention'].update(rope_scaling)
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
              norm_topk_prob=bool(m.moe.norm_topk_prob), decoder_sparse_step=1,
              mlp_only_layers=[i for i, t in enumerate(m.mlp_types) if t == 'dense'],
              attention_bias=False, use_sliding_window=False, sliding_window=None)


def read_config(path: str) -> dict:
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has no config.json; a Hugging Face model directory holds '
                          'config.json and *.safetensors')
  return read_json(file, 'Hugging Face config', CheckpointError)


# ----------------------------------------------------------------------------- layouts


def param_map(spec_shapes: dict, family: str = 'llama', model_cfg=None) -> dict[str, tuple[str, int, tuple | None]]:
  """{lm parameter: (HF tensor name with {i} for stacked layers ({e}: experts), layout, part)}
  for base weights.

  layout: n > 0 for a kernel [*in (n dims), *out] stored as [prod(out), prod(in)]; 0 for the
  same array; FLAT for a [H, K] bias stored as [H * K]. part: None, or (index, names) when the
  HF tensor is the row-wise concatenation of the lm parameters `names` (Phi-3's fused layers).
  """
  if family in REGISTRY:
    return REGISTRY[family].tensors(model_cfg, spec_shapes)
  post = family in ('gemma2', 'gemma3_text')
  layer = 'model.layers.{i}.'
  out = {'embed': ('model.embed_tokens.weight', 0), 'final_norm.scale': ('model.norm.weight', 0),
         'layers.attn_norm.scale': (layer + 'input_layernorm.weight', 0),
         'layers.mlp_norm.scale': (layer + ('pre_feedforward_layernorm.weight' if post
                                            else 'post_attention_layernorm.weight'), 0),
         'layers.attn_post_norm.scale': (layer + 'post_attention_layernorm.weight', 0),
         'layers.mlp_post_norm.scale': (layer + 'post_feedforward_layernorm.weight', 0),
         'layers.attn.q_norm.scale': (layer + 'self_attn.q_norm.weight', 0),
         'layers.attn.k_norm.scale': (layer + 'self_attn.k_norm.weight', 0)}
  out = {k: (*v, None) for k, v in out.items()}
  fused = FUSED.get(family, {})
  for module, hf_module in MODULES.items():
    kernel = module + '.kernel'
    if module in fused:
      name, index = fused[module]
      parts = tuple(m + '.kernel' for m, (n, _) in fused.items() if n == name)
      out[kernel] = (name + '.weight', IN_DIMS.get(module, 1), (index, parts))
    else:
      out[kernel] = (hf_module + '.weight', IN_DIMS.get(module, 1), None)
    out[module + '.bias'] = (hf_module + '.bias', FLAT, None)
  if 'layers.moe.router' in spec_shapes:
    out.update(expert_param_map(family))
  return {k: v for k, v in out.items() if k in spec_shapes}


# lm expert module -> HF module per family ({e}: expert index); the router is `<moe>.gate`.
EXPERT_MODULES = {
    'mixtral': ('model.layers.{i}.block_sparse_moe',
                {'layers.moe.gate': 'experts.{e}.w1', 'layers.moe.up': 'experts.{e}.w3',
                 'layers.moe.down': 'experts.{e}.w2'}),
    'qwen3_moe': ('model.layers.{i}.mlp',
                  {'layers.moe.gate': 'experts.{e}.gate_proj', 'layers.moe.up': 'experts.{e}.up_proj',
                   'layers.moe.down': 'experts.{e}.down_proj'}),
}


def expert_param_map(family: str) -> dict[str, tuple[str, int, None]]:
  """{lm parameter: (HF tensor name with {i} and {e}, layout, part)} for a Mixture-of-Experts family:
  expert kernels [L, E, in, out] are one HF [out, in] tensor per layer and expert."""
  if family not in EXPERT_MODULES:
    raise CheckpointError(f'a model with experts exports as {" or ".join(MOE_FAMILIES.values())}, '
                          f'not as {family!r}')
  prefix, experts = EXPERT_MODULES[family]
  out = {'layers.moe.router': (prefix + '.gate.weight', 1, None)}
  out.update({m + '.kernel': (f'{prefix}.{hf_m}.weight', 1, None) for m, hf_m in experts.items()})
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


def _hf_names(template: str, layers: tuple | None, experts: int | None = None) -> list[str]:
  """The HF tensors of one lm parameter: `layers` are the model layers of its rows (None: not
  stacked), `experts` the experts per layer."""
  if experts is not None:  # layer-major, as the lm array [n, E, ...] is laid out
    return [template.format(i=i, e=e) for i in layers for e in range(experts)]
  return [template] if layers is None else [template.format(i=i) for i in layers]


def fused_rows(shapes: dict, table: dict, name: str) -> tuple[slice | None, int]:
  """(rows of the HF tensor holding lm parameter `name`, that tensor's row count)."""
  template, layout, part = table[name]
  one = lambda n: hf_shape(shapes[n][stacked_dims(n, table[n][0]):], layout)[0]
  if part is None:
    return None, one(name)
  index, parts = part
  sizes = [one(n) for n in parts]
  start = sum(sizes[:index])
  return slice(start, start + sizes[index]), sum(sizes)


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


def read_stacked(reader, names, shape, layout, dtype, stacked, rows=None):
  """read(index) for one lm parameter whose HF tensors are `names` (one per layer if stacked;
  stacked=2: one per layer and expert, layer-major); `rows`: the slice of each HF tensor that
  holds it (a part of a fused tensor)."""
  n = int(stacked)

  def one(name, one_shape, index):
    if rows is None:  # only this device's rows and columns are read
      return np.asarray(reader.read(name, one_shape, layout, index), dtype)
    # a fused tensor's part: read whole, then sliced
    return np.asarray(to_lm(reader.get(name)[rows], one_shape, layout)[index], dtype)

  def read(index):
    index = tuple(index)
    if not n:
      return one(names[0], shape, index)
    grid = np.arange(math.prod(shape[:n])).reshape(shape[:n])[index[:n]]
    parts = [one(names[j], shape[n:], index[n:]) for j in grid.reshape(-1)]
    return np.stack(parts).reshape(*grid.shape, *parts[0].shape)
  return read


def check_tensors(reader, expected: dict, source: str, tied: bool, ignored: str = '') -> None:
  """expected: {HF name: (shape, lm name)}; `ignored`: a regex of tensors the family's
  transformers class skips. Errors name the first offending tensor."""
  for name, (shape, lm_name) in expected.items():
    if name not in reader:
      raise CheckpointError(f'{source}: tensor {name!r} is missing (needed for lm parameter '
                            f'{lm_name!r}); the directory must hold the whole model its '
                            'config.json describes')
    if shape is not None and tuple(reader.shape(name)) != tuple(shape):
      raise CheckpointError(f'{source}: tensor {name!r} has shape {tuple(reader.shape(name))}, but '
                            f'the config implies {tuple(shape)} (lm parameter {lm_name!r})')
  unknown = [n for n in reader.names() if n not in expected and not n.endswith(IGNORED_SUFFIXES)
             and not (tied and n == 'lm_head.weight') and not (ignored and re.match(ignored, n))]
  if unknown:
    raise CheckpointError(f'{source}: tensor {unknown[0]!r} has no place in this model '
                          f'({len(unknown)} unknown tensors; an unsupported architecture variant?)')


def load_params(path: str, spec, shardings: dict) -> dict:
  """The base weights of HF directory `path` as {lm name: array} placed with `shardings`."""
  reader = mxfp4.wrap(Reader(path), path)  # MXFP4 experts (gpt-oss) read dequantized
  moe = n_experts(spec.cfg)
  # The file layout is the directory's own (config.json's model_type), whatever the run calls it.
  model_type = read_config(path).get('model_type', 'llama')
  table = param_map(spec.shapes, model_type, spec.cfg)
  table, custom = _plain(table), _custom(table)
  shapes = {n: s.shape for n, s in spec.shapes.items()}
  expected, plan = {}, {}
  for entry in custom:
    expected.update({entry.template.format(i=i): (None, entry.names[0])
                     for i in stack_lib.layer_rows(spec.cfg, entry.names[0])})
  for name, (template, layout, _) in table.items():
    shape = spec.shapes[name].shape
    stacked = stacked_dims(name, template)
    names = _hf_names(template, stack_lib.layer_rows(spec.cfg, name) if stacked else None,
                      moe if stacked == 2 else None)
    rows, total = fused_rows(shapes, table, name)
    one = hf_shape(shape[stacked:], layout)
    expected.update({n: ((total, *one[1:]), name) for n in names})
    plan[name] = (names, stacked, layout, rows)
  family = REGISTRY.get(model_type)
  check_tensors(reader, expected, path, spec.cfg.tie_embeddings,
                family.ignored(spec.cfg) if family and family.ignored else '')
  params = {}
  for name, (names, stacked, layout, rows) in plan.items():
    shape, dtype = spec.shapes[name].shape, spec.shapes[name].dtype
    params[name] = place(shape, shardings[name],
                         read_stacked(reader, names, shape, layout, dtype, stacked, rows))
  for entry in custom:
    for name, full in zip(entry.names, _read_custom(reader, entry, spec, path)):
      params[name] = place(full.shape, shardings[name], lambda index, full=full: full[tuple(index)])
  return params


def _plain(table: dict) -> dict:
  return {k: v for k, v in table.items() if not isinstance(v, Custom)}


def _custom(table: dict) -> list:
  return [v for v in table.values() if isinstance(v, Custom)]


def _read_custom(reader, entry, spec, source: str) -> list:
  """The lm arrays (stacked over their layers) that `entry`'s HF tensors hold."""
  per_name = [[] for _ in entry.names]
  for i in stack_lib.layer_rows(spec.cfg, entry.names[0]):
    tensor = entry.template.format(i=i)
    hf_array = np.asarray(reader.get(tensor))
    try:
      parts = entry.to_lm(hf_array)
    except ValueError:
      parts = None
    wants = [tuple(spec.shapes[name].shape[1:]) for name in entry.names]
    if parts is None or [tuple(p.shape) for p in parts] != wants:
      held = ', '.join(f'{n!r} {w}' for n, w in zip(entry.names, wants))
      raise CheckpointError(f'{source}: tensor {tensor!r} has shape {tuple(hf_array.shape)}, which '
                            f'does not hold what the config implies: lm parameters {held}')
    for j, name in enumerate(entry.names):
      per_name[j].append(np.asarray(parts[j], spec.shapes[name].dtype))
  return [np.stack(arrays) for arrays in per_name]


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
  family = family or family_of(model_cfg)
  config = hf_config(model_cfg, dtype=dtype, family=family, **config_extra)
  os.makedirs(path, exist_ok=True)
  table = param_map(params, family, model_cfg)
  table, custom = _plain(table), _custom(table)
  shapes = {n: p.shape for n, p in params.items()}
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  tensors = []
  for k, entry in enumerate(custom):
    one = entry.to_hf(*(np.zeros(params[n].shape[1:], np.float32) for n in entry.names)).shape
    tensors += [(entry.template.format(i=layer), one, np_dtype, (('custom', k), row))
                for row, layer in enumerate(stack_lib.layer_rows(model_cfg, entry.names[0]))]
  for name, (template, layout, part) in table.items():
    if part is not None and part[0] > 0:
      continue  # written with the fused tensor's first part
    key = part[1] if part else (name,)  # the lm parameters concatenated into this tensor
    shape = params[name].shape
    stacked = stacked_dims(name, template)
    total = fused_rows(shapes, table, name)[1]
    one = hf_shape(shape[stacked:], layout)
    layers = stack_lib.layer_rows(model_cfg, name)
    if stacked == 2:
      tensors += [(template.format(i=layer, e=e), (total, *one[1:]), np_dtype, (key, (row, e)))
                  for row, layer in enumerate(layers) for e in range(shape[1])]
    elif stacked:
      tensors += [(template.format(i=layer), (total, *one[1:]), np_dtype, (key, row))
                  for row, layer in enumerate(layers)]
    else:
      tensors.append((template, (total, *one[1:]), np_dtype, (key, None)))

  def fetch(names):
    if names[0] == 'custom':
      entry = custom[names[1]]
      arrays = [host(params[n]) for n in entry.names]
      return np.stack([entry.to_hf(*(a[row] for a in arrays)) for row in range(len(arrays[0]))])
    arrays = []
    for name in names:
      template, layout, _ = table[name]
      array, stacked = host(params[name]), stacked_dims(name, template)
      if stacked:
        flat = array.reshape(-1, *array.shape[stacked:])
        arrays.append(np.stack([to_hf(a, layout) for a in flat]).reshape(
            *array.shape[:stacked], *hf_shape(array.shape[stacked:], layout)))
      else:
        arrays.append(to_hf(array, layout))
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=-2)

  write_sharded(path, tensors, fetch, max_shard_bytes=max_shard_bytes)
  if jax.process_index() == 0:
    with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)
