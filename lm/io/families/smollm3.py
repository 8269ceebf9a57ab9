"""SmolLM3: Llama with NoPE layers (`no_rope_layers`: 1 where a layer rotates, 0 where it does
not; by default every 4th layer has no RoPE) and optional sliding windows on NoPE layers."""

from __future__ import annotations


from lm.config import mla_enabled
from lm.io.families import common


def to_lm(hf: dict) -> dict:
  L = hf['num_hidden_layers']
  interval = hf.get('no_rope_layer_interval', 4)
  use_rope = hf.get('no_rope_layers') or [int((i + 1) % interval != 0) for i in range(L)]
  full, _ = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  types = ()
  window = 0
  if hf.get('use_sliding_window') and hf.get('sliding_window'):
    types = common.layer_types_from_hf(hf) or tuple(
        'sliding' if not use_rope[i] else 'full' for i in range(L))
    window = int(hf['sliding_window'])
  bias = bool(hf.get('attention_bias'))
  return dict(common.llama_fields(hf), tie_embeddings=bool(hf.get('tie_word_embeddings', True)),
              rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, attn_out_bias=bias,
              mlp_bias=bool(hf.get('mlp_bias')), rope_layers=tuple(int(bool(u)) for u in use_rope),
              layer_types=types if len(set(types)) > 1 else (), sliding_window=window,
              hf_family='smollm3')


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, 'smollm3', 'SmolLM3ForCausalLM')
  out.update(no_rope_layers=list(m.rope_layers or (1,) * m.n_layers),
             attention_bias=bool(m.qkv_bias), mlp_bias=bool(m.mlp_bias),
             use_sliding_window=bool(m.sliding_window), sliding_window=m.sliding_window or None,
             layer_types=common.layer_types_to_hf(m) if m.sliding_window else
             ['full_attention'] * m.n_layers)
  return out


def tensors(m, shapes: dict) -> dict:
  del m
  return common.llama_tensors(shapes)


def unfit(m) -> str | None:
  checks = {'mla': not mla_enabled(m), 'norm_placement': m.norm_placement == 'pre', 'qk_norm': not m.qk_norm,
            'norm_offset': m.norm_offset == 0.0, 'embed_scale': not m.embed_scale,
            'mlp_activation': m.mlp_activation == 'silu', 'attn_output_gate': not m.attn_output_gate,
            'partial_rotary_factor': m.partial_rotary_factor == 1.0,
            'qkv_bias': m.qkv_bias == m.attn_out_bias, 'mlp_types': not m.mlp_types,
            'layer_types': set(m.layer_types) <= {'sliding', 'full'},
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap, 'rope_local_theta': not m.rope_local_theta}
  return next((field for field, ok in checks.items() if not ok), None)


FAMILY = common.Family('smollm3', 'SmolLM3ForCausalLM', to_lm, to_hf, tensors, unfit)

