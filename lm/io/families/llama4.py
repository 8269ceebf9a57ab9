"""Llama 4 text (`Llama4ForCausalLM`, model_type llama4_text): RoPE on neighbouring dim pairs,
NoPE every 4th layer with full attention and query temperature, chunked local attention on the
RoPE layers with weightless q/k RMSNorm, dense MLPs named `feed_forward`.

Its Mixture-of-Experts layers (top-1 sigmoid routing plus a shared expert, `moe_layers`) come
with the MoE routers of issue 26; until then a checkpoint with MoE layers is refused in one line.
"""

from __future__ import annotations

from lm.config import mla_enabled
from lm.errors import CheckpointError
from lm.io.families import common


def to_lm(hf: dict) -> dict:
  L = hf['num_hidden_layers']
  interval = hf.get('no_rope_layer_interval', 4)
  use_rope = hf.get('no_rope_layers') or [int((i + 1) % interval != 0) for i in range(L)]
  step = hf.get('interleave_moe_layer_step', 1)
  moe_layers = hf.get('moe_layers')
  if moe_layers is None:
    moe_layers = list(range(step - 1, L, step))
  if moe_layers:
    raise CheckpointError(f'Llama4ForCausalLM with Mixture-of-Experts layers {moe_layers} is not '
                          'supported yet (its top-1 sigmoid router and shared expert arrive with '
                          'the MoE routers); dense Llama 4 (moe_layers=[]) loads')
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
  if set(types) == {'chunked'}:
    fields['layer_types'] = ('chunked',) * L
  if hf.get('attn_temperature_tuning', True):
    fields.update(attn_temperature_floor_scale=float(hf.get('floor_scale', 8192)),
                  attn_temperature_scale=float(hf.get('attn_scale', 0.1)))
  return fields


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, 'llama4_text', 'Llama4ForCausalLM')
  types = tuple(m.layer_types) or ('full',) * m.n_layers
  out.update(intermediate_size_mlp=m.mlp_dim, moe_layers=[], num_local_experts=1,
             no_rope_layers=list(m.rope_layers or (1,) * m.n_layers),
             attention_chunk_size=m.attention_chunk_size or None,
             layer_types=[{'chunked': 'chunked_attention', 'full': 'full_attention'}[t]
                          for t in types],
             use_qk_norm=bool(m.qk_l2_norm), attention_bias=bool(m.qkv_bias),
             attn_temperature_tuning=bool(m.attn_temperature_floor_scale),
             floor_scale=int(m.attn_temperature_floor_scale or 8192),
             attn_scale=float(m.attn_temperature_scale or 0.1))
  return out


def tensors(m, shapes: dict) -> dict:
  del m
  ff = common.LAYER + 'feed_forward.'
  return common.llama_tensors(shapes, modules={'layers.mlp.gate': ff + 'gate_proj',
                                               'layers.mlp.up': ff + 'up_proj',
                                               'layers.mlp.down': ff + 'down_proj'})


def unfit(m) -> str | None:
  checks = {'mla': not mla_enabled(m), 'rope_interleaved': bool(m.rope_interleaved), 'norm_placement': m.norm_placement == 'pre',
            'qk_norm': not m.qk_norm, 'norm_offset': m.norm_offset == 0.0,
            'embed_scale': not m.embed_scale, 'mlp_activation': m.mlp_activation == 'silu',
            'attn_output_gate': not m.attn_output_gate, 'mlp_bias': not m.mlp_bias,
            'partial_rotary_factor': m.partial_rotary_factor == 1.0, 'mlp_types': not m.mlp_types,
            'qkv_bias': m.qkv_bias == m.attn_out_bias,
            'layer_types': set(m.layer_types) <= {'chunked', 'full'},
            'sliding_window': not m.sliding_window, 'attn_sinks': not m.attn_sinks,
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap, 'rope_local_theta': not m.rope_local_theta}
  return next((field for field, ok in checks.items() if not ok), None)


FAMILY = common.Family('llama4_text', 'Llama4ForCausalLM', to_lm, to_hf, tensors, unfit)
