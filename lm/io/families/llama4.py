"""Llama 4 text (`Llama4ForCausalLM`, model_type llama4_text): RoPE on neighbouring dim pairs,
NoPE every 4th layer with full attention and query temperature, chunked local attention on the
RoPE layers with weightless q/k RMSNorm, dense MLPs named `feed_forward`.

Its Mixture-of-Experts layers (`moe_layers`: by default every `interleave_moe_layer_step`-th)
route each token to its top-k experts by sigmoid score, scaling the expert's input, beside a
shared expert; HF holds a layer's experts in one `gate_up_proj` [E, D, 2F] (gate then up halves)
and one `down_proj` [E, F, D].
"""

from __future__ import annotations

import numpy as np

from lm.config import mla_enabled, n_experts
from lm.io.families import common

FF = common.LAYER + 'feed_forward.'


def to_lm(hf: dict) -> dict:
  L = hf['num_hidden_layers']
  interval = hf.get('no_rope_layer_interval', 4)
  use_rope = hf.get('no_rope_layers') or [int((i + 1) % interval != 0) for i in range(L)]
  step = hf.get('interleave_moe_layer_step', 1)
  moe_layers = hf.get('moe_layers')
  if moe_layers is None:
    moe_layers = list(range(step - 1, L, step))
  chunk = hf.get('attention_chunk_size')
  types = common.layer_types_from_hf(hf) or tuple(
      'chunked' if rope and chunk else 'full' for rope in use_rope)
  full, _ = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  fields = dict(common.llama_fields(hf), mlp_dim=hf.get('intermediate_size_mlp', hf['intermediate_size']),
                norm_eps=float(hf.get('rms_norm_eps', 1e-5)), rope_theta=theta, rope_scaling=scaling,
                rope_interleaved=True, rope_layers=tuple(int(bool(u)) for u in use_rope),
                layer_types=types if len(set(types)) > 1 else (),
                attention_chunk_size=int(chunk or 0) if 'chunked' in types else 0,
                qk_l2_norm=bool(hf.get('use_qk_norm', True)),
                qkv_bias=bool(hf.get('attention_bias')), attn_out_bias=bool(hf.get('attention_bias')),
                hf_family='llama4_text')
  if moe_layers:
    mlp = tuple('moe' if i in moe_layers else 'dense' for i in range(L))
    F = hf['intermediate_size']
    fields.update(mlp_types=mlp if len(set(mlp)) > 1 else (),
                  moe=dict(n_experts=int(hf['num_local_experts']),
                           experts_per_token=int(hf.get('num_experts_per_tok', 1)), expert_dim=F,
                           router='topk_sigmoid', shared_dim=F))
  if set(types) == {'chunked'}:
    fields['layer_types'] = ('chunked',) * L
  if hf.get('attn_temperature_tuning', True):
    fields.update(attn_temperature_floor_scale=float(hf.get('floor_scale', 8192)),
                  attn_temperature_scale=float(hf.get('attn_scale', 0.1)))
  return fields


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, 'llama4_text', 'Llama4ForCausalLM')
  types = tuple(m.layer_types) or ('full',) * m.n_layers
  moe = m.moe
  mlp = tuple(m.mlp_types) or (('moe' if n_experts(m) else 'dense'),) * m.n_layers
  out.update(intermediate_size_mlp=m.mlp_dim,
             moe_layers=[i for i, t in enumerate(mlp) if t == 'moe'],
             num_local_experts=moe.n_experts or 1, num_experts_per_tok=moe.experts_per_token,
             intermediate_size=(moe.expert_dim or m.mlp_dim) if n_experts(m) else m.mlp_dim,
             no_rope_layers=list(m.rope_layers or (1,) * m.n_layers),
             attention_chunk_size=m.attention_chunk_size or None,
             layer_types=[{'chunked': 'chunked_attention', 'full': 'full_attention'}[t]
                          for t in types],
             use_qk_norm=bool(m.qk_l2_norm), attention_bias=bool(m.qkv_bias),
             attn_temperature_tuning=bool(m.attn_temperature_floor_scale),
             floor_scale=int(m.attn_temperature_floor_scale or 8192),
             attn_scale=float(m.attn_temperature_scale or 0.1))
  return out


def _gate_up() -> common.Custom:
  """gate_up_proj [E, D, 2F], gate then up halves <-> the experts' gate and up kernels."""
  return common.Custom(FF + 'experts.gate_up_proj', ('layers.moe.gate.kernel', 'layers.moe.up.kernel'),
                       lambda w: tuple(np.split(w, 2, axis=-1)),
                       lambda gate, up: np.concatenate([gate, up], axis=-1))


def tensors(m, shapes: dict) -> dict:
  del m
  table = common.llama_tensors(shapes, modules={'layers.mlp.gate': FF + 'gate_proj',
                                                'layers.mlp.up': FF + 'up_proj',
                                                'layers.mlp.down': FF + 'down_proj'})
  if 'layers.moe.router' in shapes:
    table.update({'layers.moe.router': (FF + 'router.weight', 1, None),
                  # One tensor per layer holds every expert: stacked over layers only.
                  'layers.moe.down.kernel': (FF + 'experts.down_proj', 0, None),
                  ('layers.moe.gate.kernel', 'layers.moe.up.kernel'): _gate_up()})
    for lm_name, hf_name in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
      table[f'layers.moe.shared.{lm_name}.kernel'] = (FF + 'shared_expert.' + hf_name + '.weight',
                                                      1, None)
  return {k: v for k, v in table.items() if not isinstance(k, str) or k in shapes}


def unfit(m) -> str | None:
  moe = m.moe
  if n_experts(m):
    F = moe.expert_dim or m.mlp_dim
    moe_checks = {'moe.router': moe.router == 'topk_sigmoid', 'moe.shared_dim': moe.shared_dim == F,
                  'moe.shared_gate': not moe.shared_gate, 'moe.router_bias': not moe.router_bias,
                  'moe.expert_bias': not moe.expert_bias, 'moe.swiglu_limit': not moe.swiglu_limit}
    field = next((f for f, ok in moe_checks.items() if not ok), None)
    if field:
      return field
  checks = {'mla': not mla_enabled(m), 'rope_interleaved': bool(m.rope_interleaved), 'norm_placement': m.norm_placement == 'pre',
            'qk_norm': not m.qk_norm, 'norm_offset': m.norm_offset == 0.0,
            'embed_scale': not m.embed_scale, 'mlp_activation': m.mlp_activation == 'silu',
            'attn_output_gate': not m.attn_output_gate, 'mlp_bias': not m.mlp_bias,
            'partial_rotary_factor': m.partial_rotary_factor == 1.0,
            'qkv_bias': m.qkv_bias == m.attn_out_bias,
            'layer_types': set(m.layer_types) <= {'chunked', 'full'},
            'sliding_window': not m.sliding_window, 'attn_sinks': not m.attn_sinks,
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap, 'rope_local_theta': not m.rope_local_theta}
  return next((field for field, ok in checks.items() if not ok), None)


FAMILY = common.Family('llama4_text', 'Llama4ForCausalLM', to_lm, to_hf, tensors, unfit)
