"""Qwen3.5 text (`Qwen3_5ForCausalLM`, model_type qwen3_5_text): a hybrid stack of gated
DeltaNet layers ('linear_attention') and full attention layers (by default 3 : 1). The attention
has a sigmoid output gate (q_proj holds each head's query and gate, one after the other), RoPE on
the first quarter of each head (`partial_rotary_factor`) and q/k norms; every RMSNorm but the
DeltaNet's gated one multiplies by (1 + weight). Text-only positions make Qwen3.5's M-RoPE plain
RoPE.

The linear-attention tensors map through lm/model/mixers/gated_deltanet.py's `hf_tensors`.
"""

from __future__ import annotations

import numpy as np

from lm.config import head_dim, mla_enabled
from lm.io.families import common
from lm.model.mixers import gated_deltanet

FAMILY_NAME, ARCHITECTURE = 'qwen3_5_text', 'Qwen3_5ForCausalLM'


def to_lm(hf: dict) -> dict:
  L = hf['num_hidden_layers']
  types = common.layer_types_from_hf(hf) or tuple(
      'linear' if (i + 1) % hf.get('full_attention_interval', 4) else 'full' for i in range(L))
  full, _ = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  partial = full.get('partial_rotary_factor', hf.get('partial_rotary_factor', 0.25))
  bias = bool(hf.get('attention_bias'))
  return dict(common.llama_fields(hf), rope_theta=theta, rope_scaling=scaling,
              partial_rotary_factor=float(partial), norm_offset=1.0, qk_norm=True,
              attn_output_gate=True, qkv_bias=bias, attn_out_bias=bias,
              layer_types=types if len(set(types)) > 1 else (('linear',) * L if 'linear' in types else ()),
              linear_attn=dict(n_key_heads=hf['linear_num_key_heads'],
                               n_value_heads=hf['linear_num_value_heads'],
                               key_head_dim=hf['linear_key_head_dim'],
                               value_head_dim=hf['linear_value_head_dim'],
                               conv_kernel=hf.get('linear_conv_kernel_dim', 4)),
              hf_family=FAMILY_NAME)


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, FAMILY_NAME, ARCHITECTURE)
  out['rope_parameters']['partial_rotary_factor'] = m.partial_rotary_factor
  la = m.linear_attn
  types = tuple(m.layer_types) or ('full',) * m.n_layers
  out.update(attention_bias=bool(m.qkv_bias),
             layer_types=[{'linear': 'linear_attention', 'full': 'full_attention'}[t] for t in types],
             linear_num_key_heads=la.n_key_heads, linear_num_value_heads=la.n_value_heads,
             linear_key_head_dim=la.key_head_dim, linear_value_head_dim=la.value_head_dim,
             linear_conv_kernel_dim=la.conv_kernel)
  return out


def _q_and_gate(m, suffix: str) -> common.Custom:
  """q_proj rows [H, 2, K] (query then gate per head) <-> q and gate ([D, H, K] kernels or
  [H, K] biases)."""
  H, K = m.n_heads, head_dim(m)
  kernel = suffix == 'kernel'

  def to_lm(w):
    per_head = w.reshape(H, 2, K, -1) if kernel else w.reshape(H, 2, K)
    parts = per_head[:, 0], per_head[:, 1]
    return tuple(np.transpose(p, (2, 0, 1)) for p in parts) if kernel else parts

  def to_hf(q, gate):
    if kernel:
      q, gate = (np.transpose(x, (1, 2, 0)) for x in (q, gate))  # [H, K, D]
    stacked = np.stack([q, gate], axis=1)
    return stacked.reshape(2 * H * K, -1) if kernel else stacked.reshape(-1)

  name = 'weight' if kernel else 'bias'
  return common.Custom(common.LAYER + f'self_attn.q_proj.{name}',
                       (f'layers.attn.q.{suffix}', f'layers.attn.gate.{suffix}'), to_lm, to_hf)


LINEAR = common.LAYER + 'linear_attn.'
# The DeltaNet projections HF keeps one per tensor: plain table entries, so LoRA on them exports
# to PEFT under HF's names. q, k and v share one fused in_proj_qkv and the convolution one
# conv1d: those map through gated_deltanet.hf_tensors.
LINEAR_MODULES = {'layers.linear_attn.z': LINEAR + 'in_proj_z', 'layers.linear_attn.b': LINEAR + 'in_proj_b',
                  'layers.linear_attn.a': LINEAR + 'in_proj_a', 'layers.linear_attn.o': LINEAR + 'out_proj'}


def linear_attention_tensors(m, family: str = 'qwen3_5') -> dict:
  """The DeltaNet's tensor table: plain entries for the tensors HF keeps one per parameter, the
  fused ones (conv1d, and in_proj_qkv or Qwen3-Next's in_proj_qkvz/in_proj_ba) as Custom."""
  table = {'layers.linear_attn.o.kernel': (LINEAR + 'out_proj.weight', 2, None),
           'layers.linear_attn.A_log': (LINEAR + 'A_log', 0, None),
           'layers.linear_attn.dt_bias': (LINEAR + 'dt_bias', 0, None),
           'layers.linear_attn.norm.scale': (LINEAR + 'norm.weight', 0, None)}
  if family == 'qwen3_5':
    table.update({module + '.kernel': (hf + '.weight', 1, None)
                  for module, hf in LINEAR_MODULES.items() if not module.endswith('.o')})
  fused = {k: v for k, v in gated_deltanet.hf_tensors(family, m).items() if isinstance(k, tuple)}
  for key, (hf_name, to_lm, to_hf) in fused.items():
    names = tuple('layers.linear_attn.' + n for n in key)
    table[names] = common.Custom(LINEAR + hf_name, names, to_lm, to_hf)
  return table


def attention_tensors(m, shapes: dict) -> dict:
  """Llama's table with q_proj holding each head's query and gate (Custom)."""
  table = common.llama_tensors(shapes)
  for name in ('layers.attn.q.kernel', 'layers.attn.q.bias'):
    table.pop(name, None)
  custom = [_q_and_gate(m, 'kernel')] + ([_q_and_gate(m, 'bias')] if m.qkv_bias else [])
  table.update({entry.names: entry for entry in custom if entry.names[0] in shapes})
  return table


def tensors(m, shapes: dict) -> dict:
  table = attention_tensors(m, shapes)
  if m.layer_types and 'linear' in m.layer_types:
    table.update({k: v for k, v in linear_attention_tensors(m).items()
                  if isinstance(k, tuple) or k in shapes})
  return table


def unfit(m, allow=()) -> str | None:
  """The first field Qwen3.5 cannot express, skipping the fields in `allow` (its MoE siblings
  check those themselves)."""
  checks = {'moe.n_experts': not m.moe.n_experts, 'mla': not mla_enabled(m),
            'attn_output_gate': bool(m.attn_output_gate), 'norm_offset': m.norm_offset == 1.0,
            'qk_norm': bool(m.qk_norm), 'qk_norm_scope': m.qk_norm_scope == 'head',
            'norm_placement': m.norm_placement == 'pre', 'embed_scale': not m.embed_scale,
            'mlp_activation': m.mlp_activation == 'silu', 'mlp_bias': not m.mlp_bias,
            'mlp_types': not m.mlp_types, 'rope_layers': not m.rope_layers,
            'rope_interleaved': not m.rope_interleaved, 'qkv_bias': m.qkv_bias == m.attn_out_bias,
            'layer_types': set(m.layer_types) <= {'linear', 'full'},
            'sliding_window': not m.sliding_window, 'attn_sinks': not m.attn_sinks,
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap}
  return next((field for field, ok in checks.items() if not ok and field not in allow), None)


FAMILY = common.Family(FAMILY_NAME, ARCHITECTURE, to_lm, to_hf, tensors, unfit,
                       modules=LINEAR_MODULES)
