"""Gemma 4 text (`Gemma4ForCausalLM`, model_type gemma4_text): Gemma 3's sandwich norms, GeGLU,
q/k norms and sliding/full layers, with norms that multiply by their weight (not 1 + weight),
attention logits unscaled (the q/k norms set their size), weightless value norms, and:

- 'full' layers with their own head dim and KV heads (`global_head_dim`, per_layer_config) and
  proportional RoPE (a share of the frequencies, the rest 0); with `attention_k_eq_v` their
  values are the keys' projection: lm's GlobalAttention part (`layers.attn_global.*`);
- the last `num_kv_shared_layers` layers reuse the keys and values of the last earlier layer of
  their type and have no k/v weights (`layers.attn_reuse.*`, `layers.attn_global_reuse.*`);
  with `use_double_wide_mlp` their MLP is twice as wide (`layers.mlp_wide.*`);
- per-layer input embeddings (`hidden_size_per_layer_input`): a second embedding table and a
  projection of the token embedding, gated into each layer after its MLP
  (`layers.per_layer_input.*`, lm/model/mixers/per_layer_input.py);
- a scalar per layer on its output (`layer_scalar`);
- with `enable_moe_block` (26B-A4B), in every layer `num_experts` experts of
  `moe_intermediate_size` beside the dense MLP, each branch with its own norms, and a router that
  reads the un-normed residual: lm's MoE part with the dense MLP as its shared expert,
  `model.moe.branch_norms` and the `scaled_softmax` router (lm/model/moe.py, routers.py). HF
  holds a layer's experts in two tensors, `experts.gate_up_proj` [E, 2F, D] (gate rows, then up)
  and `experts.down_proj` [E, D, F].

Not built: the vision/audio towers of Gemma4ForConditionalGeneration, refused in one line.
"""

from __future__ import annotations

import numpy as np

from lm.config import head_dim, mla_enabled, n_experts
from lm.errors import CheckpointError
from lm.io.families import common

FAMILY_NAME, ARCHITECTURE = 'gemma4_text', 'Gemma4ForCausalLM'
LAYER = common.LAYER
EXPERTS = LAYER + 'experts'  # beside the dense MLP (mlp.*), not under it
ATTENTION_STACKS = ('attn', 'attn_global', 'attn_reuse', 'attn_global_reuse')
# lm model fields only Gemma 4 sets: another family that cannot express them refuses the model.
OWN_FIELDS = ('global_head_dim', 'global_kv_heads', 'attn_k_eq_v', 'v_norm', 'kv_shared_layers',
              'per_layer_input_dim', 'layer_scale', 'wide_mlp_dim', 'moe.branch_norms')


def _refuse(field: str, value, why: str = '') -> None:
  raise CheckpointError(f'{ARCHITECTURE} with {field}={value!r} is not supported{why}')


def _layer_types(hf: dict) -> tuple:
  L = hf['num_hidden_layers']
  types = list(common.layer_types_from_hf(hf) or (
      'sliding' if (i + 1) % 6 else 'full' for i in range(L)))
  types[-1] = 'full'  # as transformers forces it
  unknown = sorted(set(types) - {'sliding', 'full'})
  if unknown:
    _refuse('layer_types', unknown[0], '; lm implements sliding_attention and full_attention here')
  return tuple(types)


def _full_layer_dims(hf: dict, types: tuple) -> tuple[int, int]:
  """(head dim, KV heads or 0) of the 'full' layers, from per_layer_config or the older keys."""
  overrides = {int(i): dict(v) for i, v in (hf.get('per_layer_config') or {}).items()}
  if not overrides:
    kv = hf.get('num_global_key_value_heads') if hf.get('attention_k_eq_v', False) else None
    return int(hf.get('global_head_dim') or 512), int(kv or 0)
  for i, values in overrides.items():
    unknown = sorted(set(values) - {'head_dim', 'num_key_value_heads'})
    if types[i] != 'full' or unknown:
      _refuse(f'per_layer_config[{i}]', values, '; lm reads head_dim and num_key_value_heads of '
              'full_attention layers only')
  distinct = {tuple(sorted(overrides.get(i, {}).items())) for i, t in enumerate(types) if t == 'full'}
  if len(distinct) > 1:
    _refuse('per_layer_config', hf['per_layer_config'], '; lm needs every full_attention layer '
            'alike')
  values = dict(distinct.pop())
  return int(values.get('head_dim') or hf.get('head_dim') or 0), int(values.get('num_key_value_heads') or 0)


def _moe_fields(hf: dict) -> dict:
  """lm's `model.moe` for the MoE block: the dense MLP is the shared expert, on its own norms."""
  fields = {}
  for field in ('num_experts', 'top_k_experts', 'moe_intermediate_size'):
    value = hf.get(field)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _refuse(field, value, '; enable_moe_block needs it a positive integer')
    fields[field] = value
  E, k = fields['num_experts'], fields['top_k_experts']
  if k > E:
    _refuse('top_k_experts', k, f'; it routes each token to at most num_experts={E} experts')
  if hf.get('use_double_wide_mlp') and hf.get('num_kv_shared_layers'):
    _refuse('use_double_wide_mlp', True, ' with enable_moe_block; lm builds the MoE block on '
            'the normal-width MLP only')
  return dict(n_experts=E, experts_per_token=k, expert_dim=fields['moe_intermediate_size'],
              router='scaled_softmax', norm_topk_prob=True, shared_dim=int(hf['intermediate_size']),
              shared_gate=False, branch_norms=True)


def to_lm(hf: dict) -> dict:
  if hf.get('use_bidirectional_attention'):
    _refuse('use_bidirectional_attention', hf['use_bidirectional_attention'],
            '; lm loads the causal Gemma 4 text models')
  activation = hf.get('hidden_activation', 'gelu_pytorch_tanh')
  if activation != 'gelu_pytorch_tanh':
    _refuse('hidden_activation', activation, '; lm implements gelu_pytorch_tanh')
  L, types = hf['num_hidden_layers'], _layer_types(hf)
  params = hf.get('rope_parameters') or {
      'sliding_attention': {'rope_type': 'default', 'rope_theta': 10_000.0},
      'full_attention': {'rope_type': 'proportional', 'partial_rotary_factor': 0.25,
                         'rope_theta': 1_000_000.0}}
  theta, scaling = common.rope_from_hf(params.get('full_attention') or {}, hf)
  local_theta, local_scaling = common.rope_from_hf(params.get('sliding_attention') or {}, hf)
  if local_scaling:
    _refuse('rope_parameters.sliding_attention', local_scaling['type'], '; lm implements default '
            'RoPE on sliding layers')
  K_full, G_full = _full_layer_dims(hf, types)
  shared = int(hf.get('num_kv_shared_layers') or 0)
  P = int(hf.get('hidden_size_per_layer_input', 256) or 0)
  fields = dict(
      common.llama_fields(hf), tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
      mlp_activation='gelu_tanh', norm_offset=0.0, embed_scale=True, norm_placement='sandwich',
      qk_norm=True, v_norm=True, query_pre_attn_scalar=1.0, layer_scale=True,
      final_logit_softcap=float(hf.get('final_logit_softcapping') or 0.0),
      sliding_window=int(hf.get('sliding_window') or 0) if 'sliding' in types else 0,
      layer_types=types, rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
      global_head_dim=K_full, global_kv_heads=G_full,
      attn_k_eq_v=bool(hf.get('attention_k_eq_v')), kv_shared_layers=shared,
      per_layer_input_dim=P,
      per_layer_input_vocab=int(hf.get('vocab_size_per_layer_input', 262_144)) if P else 0,
      qkv_bias=bool(hf.get('attention_bias')), attn_out_bias=bool(hf.get('attention_bias')),
      hf_family=FAMILY_NAME)
  if fields['per_layer_input_vocab'] == fields['vocab_size']:
    fields['per_layer_input_vocab'] = 0
  if hf.get('enable_moe_block'):
    fields['moe'] = _moe_fields(hf)
  elif hf.get('use_double_wide_mlp') and shared:
    fields.update(mlp_types=('dense',) * (L - shared) + ('wide',) * shared,
                  wide_mlp_dim=2 * hf['intermediate_size'])
  return fields


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, FAMILY_NAME, ARCHITECTURE)
  del out['hidden_act']
  # The full layers' own head dim and KV heads, as transformers saves them (per_layer_config).
  full_layer = {'head_dim': m.global_head_dim or head_dim(m),
                **({'num_key_value_heads': m.global_kv_heads} if m.global_kv_heads else {})}
  hf_types = common.layer_types_to_hf(m)
  full = dict(out.pop('rope_parameters'))
  out.update(
      hidden_activation='gelu_pytorch_tanh', attention_bias=bool(m.qkv_bias),
      layer_types=hf_types, sliding_window=m.sliding_window or m.max_seq_len,
      final_logit_softcapping=m.final_logit_softcap or None,
      rope_parameters={'full_attention': full, 'sliding_attention': {
          'rope_type': 'default', 'rope_theta': m.rope_local_theta or m.rope_theta}},
      per_layer_config={str(i): full_layer for i, t in enumerate(hf_types)
                        if t == 'full_attention'},
      attention_k_eq_v=bool(m.attn_k_eq_v),
      num_kv_shared_layers=m.kv_shared_layers, use_double_wide_mlp='wide' in m.mlp_types,
      hidden_size_per_layer_input=m.per_layer_input_dim,
      vocab_size_per_layer_input=m.per_layer_input_vocab or m.vocab_size,
      enable_moe_block=bool(n_experts(m)))
  if n_experts(m):
    out.update(num_experts=m.moe.n_experts, top_k_experts=m.moe.experts_per_token,
               moe_intermediate_size=m.moe.expert_dim or m.mlp_dim)
  return out


def _gate_up() -> common.Custom:
  """experts.gate_up_proj [E, 2F, D] (gate rows, then up) <-> the experts' gate and up kernels
  [E, D, F]."""
  return common.Custom(
      EXPERTS + '.gate_up_proj', ('layers.moe.gate.kernel', 'layers.moe.up.kernel'),
      lambda w: tuple(half.transpose(0, 2, 1) for half in np.split(w, 2, axis=1)),
      lambda gate, up: np.concatenate([gate, up], axis=2).transpose(0, 2, 1))


def _down() -> common.Custom:
  """experts.down_proj [E, D, F] <-> the experts' down kernels [E, F, D]."""
  return common.Custom(EXPERTS + '.down_proj', ('layers.moe.down.kernel',),
                       lambda w: (w.transpose(0, 2, 1),), lambda down: down.transpose(0, 2, 1))


def moe_tensors() -> dict:
  """The MoE block: router, experts, the dense MLP (the shared expert) and the branch norms."""
  table = {'layers.moe.router': (LAYER + 'router.proj.weight', 1, None),
           'layers.moe.router_scale': (LAYER + 'router.scale', 0, None),
           'layers.moe.expert_scale': (LAYER + 'router.per_expert_scale', 0, None),
           'layers.moe.shared_post_norm.scale': (LAYER + 'post_feedforward_layernorm_1.weight', 0,
                                                 None),
           'layers.moe.experts_norm.scale': (LAYER + 'pre_feedforward_layernorm_2.weight', 0, None),
           'layers.moe.experts_post_norm.scale': (LAYER + 'post_feedforward_layernorm_2.weight', 0,
                                                  None),
           ('layers.moe.gate.kernel', 'layers.moe.up.kernel'): _gate_up(),
           ('layers.moe.down.kernel',): _down()}
  for p in ('gate', 'up', 'down'):
    table[f'layers.moe.shared.{p}.kernel'] = (LAYER + f'mlp.{p}_proj.weight', 1, None)
  return table


def tensors(m, shapes: dict) -> dict:
  del m
  table = common.llama_tensors(shapes, norms={
      'attn_norm': LAYER + 'input_layernorm', 'attn_post_norm': LAYER + 'post_attention_layernorm',
      'mlp_norm': LAYER + 'pre_feedforward_layernorm',
      'mlp_post_norm': LAYER + 'post_feedforward_layernorm'})
  attn = LAYER + 'self_attn.'
  for stack in ATTENTION_STACKS[1:]:
    for p in 'qkvo':
      table[f'layers.{stack}.{p}.kernel'] = (attn + f'{p}_proj.weight', 2 if p == 'o' else 1, None)
      table[f'layers.{stack}.{p}.bias'] = (attn + f'{p}_proj.bias', common.FLAT, None)
    for p in 'qk':
      table[f'layers.{stack}.{p}_norm.scale'] = (attn + f'{p}_norm.weight', 0, None)
  for p in ('gate', 'up', 'down'):
    table[f'layers.mlp_wide.{p}.kernel'] = (LAYER + f'mlp.{p}_proj.weight', 1, None)
  table.update({
      'layers.per_layer_input.gate.kernel': (LAYER + 'per_layer_input_gate.weight', 1, None),
      'layers.per_layer_input.proj.kernel': (LAYER + 'per_layer_projection.weight', 1, None),
      'layers.per_layer_input.norm.scale': (LAYER + 'post_per_layer_input_norm.weight', 0, None),
      'layers.layer_scale.scale': (LAYER + 'layer_scalar', 0, None),
      'embed_per_layer': ('model.embed_tokens_per_layer.weight', 0, None),
      'per_layer_proj.kernel': ('model.per_layer_model_projection.weight', 1, None),
      'per_layer_norm.scale': ('model.per_layer_projection_norm.weight', 0, None)})
  table.update(moe_tensors())
  # A Custom entry (a tuple of names) where its parameters are there: the MoE layers' experts.
  return {k: v for k, v in table.items() if k in shapes or not isinstance(k, str)
          and all(n in shapes for n in k)}


def ignored(m) -> str:
  """The k/v projections and norms of KV-shared layers, which some checkpoints still hold."""
  if not m.kv_shared_layers:
    return ''
  layers = '|'.join(str(i) for i in range(m.n_layers - m.kv_shared_layers, m.n_layers))
  return rf'model\.layers\.({layers})\.self_attn\.(k_proj|v_proj|k_norm|v_norm)\.'


def _moe_unfit(m) -> str | None:
  """The first `model.moe` field Gemma 4's MoE block cannot express (every layer has it)."""
  moe = m.moe
  checks = {'moe.router': moe.router == 'scaled_softmax', 'moe.branch_norms': bool(moe.branch_norms),
            'moe.shared_dim': moe.shared_dim == m.mlp_dim, 'moe.shared_gate': not moe.shared_gate,
            'moe.norm_topk_prob': bool(moe.norm_topk_prob), 'moe.router_bias': not moe.router_bias,
            'moe.expert_bias': not moe.expert_bias, 'moe.swiglu_limit': not moe.swiglu_limit,
            'moe.routed_scaling_factor': moe.routed_scaling_factor == 1.0,
            'moe.n_group': moe.n_group == 1 and moe.topk_group == 1,
            'mlp_types': set(m.mlp_types) <= {'moe'}}
  return next((field for field, ok in checks.items() if not ok), None)


def unfit(m) -> str | None:
  L, shared = m.n_layers, m.kv_shared_layers
  wide = ('dense',) * (L - shared) + ('wide',) * shared
  if n_experts(m):
    field = _moe_unfit(m)
    if field:
      return field
  checks = {
      'mla': not mla_enabled(m),
      'norm_placement': m.norm_placement == 'sandwich', 'qk_norm': bool(m.qk_norm),
      'qk_norm_scope': m.qk_norm_scope == 'head', 'v_norm': bool(m.v_norm),
      'norm_offset': m.norm_offset == 0.0, 'embed_scale': bool(m.embed_scale),
      'mlp_activation': m.mlp_activation == 'gelu_tanh', 'layer_scale': bool(m.layer_scale),
      'attn_output_gate': not m.attn_output_gate, 'mlp_bias': not m.mlp_bias,
      'partial_rotary_factor': m.partial_rotary_factor == 1.0,
      'qkv_bias': m.qkv_bias == m.attn_out_bias, 'rope_layers': all(m.rope_layers or (1,)),
      # transformers makes the last layer a full one whatever config.json says
      'layer_types': set(m.layer_types) <= {'sliding', 'full'} and common.layer_types_to_hf(m)[-1]
                     == 'full_attention', 'attn_sinks': not m.attn_sinks,
      'rope_interleaved': not m.rope_interleaved, 'qk_l2_norm': not m.qk_l2_norm,
      'attn_temperature_floor_scale': not m.attn_temperature_floor_scale,
      'query_pre_attn_scalar': m.query_pre_attn_scalar == 1.0,
      'attn_logit_softcap': not m.attn_logit_softcap,
      'mlp_types': tuple(m.mlp_types) in ((), ('dense',) * L, ('moe',) * L) or (
          shared and tuple(m.mlp_types) == wide and m.wide_mlp_dim == 2 * m.mlp_dim)}
  return next((field for field, ok in checks.items() if not ok), None)


def own_field(m) -> str | None:
  """The first Gemma 4 field model config `m` sets, which no other family can express."""
  def value(field):
    v = m
    for part in field.split('.'):
      v = v.get(part) if hasattr(v, 'get') else None
    return v
  return next((f for f in OWN_FIELDS if value(f)), None)


MODULES = {f'layers.{stack}.{p}': LAYER + f'self_attn.{p}_proj'
           for stack in ATTENTION_STACKS[1:] for p in 'qkvo'}
MODULES.update({f'layers.mlp_wide.{p}': LAYER + f'mlp.{p}_proj' for p in ('gate', 'up', 'down')})
MODULES.update({f'layers.moe.shared.{p}': LAYER + f'mlp.{p}_proj' for p in ('gate', 'up', 'down')})
FAMILY = common.Family(FAMILY_NAME, ARCHITECTURE, to_lm, to_hf, tensors, unfit, modules=MODULES,
                       ignored=ignored, experts=EXPERTS)

