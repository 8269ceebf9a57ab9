"""OLMo 2 and OLMo 3: norms after each part only (`norm_placement='post'`), q/k RMSNorm over all
heads at once, and (OLMo 3) sliding-window layers with full ones every 4th, each layer type with
its own RoPE parameters."""

from __future__ import annotations

from lm.config import mla_enabled
from lm.errors import ConfigError
from lm.io.families import common


def _to_lm(hf: dict, family: str) -> dict:
  full, local = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  fields = dict(common.llama_fields(hf), rope_theta=theta, rope_scaling=scaling,
                norm_eps=float(hf.get('rms_norm_eps', 1e-5)), norm_placement='post', qk_norm=True,
                qk_norm_scope='all', qkv_bias=bool(hf.get('attention_bias')),
                attn_out_bias=bool(hf.get('attention_bias')), hf_family=family)
  if family == 'olmo3':
    L = hf['num_hidden_layers']
    types = common.layer_types_from_hf(hf) or tuple(
        'sliding' if (i + 1) % 4 else 'full' for i in range(L))
    local_theta, local_scaling = common.rope_from_hf(local or full, hf)
    if 'sliding' in types and local_scaling:
      raise ConfigError('OLMo 3 with RoPE scaling on sliding layers is not supported')
    fields.update(layer_types=types if len(set(types)) > 1 else (),
                  sliding_window=int(hf.get('sliding_window') or 0) if 'sliding' in types else 0,
                  rope_local_theta=local_theta if 'sliding' in types else 0.0)
    if types and set(types) == {'sliding'}:
      fields['layer_types'] = ()
  return fields


def _to_hf(m, family: str, architecture: str) -> dict:
  out = common.llama_hf_config(m, family, architecture)
  out['attention_bias'] = bool(m.qkv_bias)
  if family == 'olmo3':
    local = {'rope_type': 'default', 'rope_theta': m.rope_local_theta or m.rope_theta}
    out.update(sliding_window=m.sliding_window or m.max_seq_len,
               layer_types=common.layer_types_to_hf(m),
               rope_parameters={'full_attention': out['rope_parameters'],
                                'sliding_attention': local})
  return out


def tensors(m, shapes: dict) -> dict:
  del m
  table = common.llama_tensors(shapes, norms={
      'attn_post_norm': common.LAYER + 'post_attention_layernorm',
      'mlp_post_norm': common.LAYER + 'post_feedforward_layernorm'})
  for name in ('layers.attn.q_norm.scale', 'layers.attn.k_norm.scale'):  # [H, K] stored [H * K]
    table[name] = (table[name][0], common.FLAT, None)
  return table


def _unfit(m, family: str) -> str | None:
  checks = {'mla': not mla_enabled(m), 'norm_placement': m.norm_placement == 'post', 'qk_norm': bool(m.qk_norm),
            'qk_norm_scope': m.qk_norm_scope == 'all', 'norm_offset': m.norm_offset == 0.0,
            'embed_scale': not m.embed_scale, 'mlp_activation': m.mlp_activation == 'silu',
            'attn_output_gate': not m.attn_output_gate, 'mlp_bias': not m.mlp_bias,
            'partial_rotary_factor': m.partial_rotary_factor == 1.0,
            'qkv_bias': m.qkv_bias == m.attn_out_bias, 'mlp_types': not m.mlp_types,
            'rope_layers': not m.rope_layers, 'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap,
            'layer_types': set(m.layer_types) <= ({'sliding', 'full'} if family == 'olmo3' else set()),
            'sliding_window': family == 'olmo3' or not m.sliding_window}
  return next((field for field, ok in checks.items() if not ok), None)


OLMO2 = common.Family('olmo2', 'Olmo2ForCausalLM', lambda hf: _to_lm(hf, 'olmo2'),
                      lambda m: _to_hf(m, 'olmo2', 'Olmo2ForCausalLM'), tensors,
                      lambda m: _unfit(m, 'olmo2'))
OLMO3 = common.Family('olmo3', 'Olmo3ForCausalLM', lambda hf: _to_lm(hf, 'olmo3'),
                      lambda m: _to_hf(m, 'olmo3', 'Olmo3ForCausalLM'), tensors,
                      lambda m: _unfit(m, 'olmo3'))
