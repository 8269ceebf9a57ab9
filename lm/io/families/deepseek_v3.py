"""DeepSeek-V3: multi-head latent attention in every layer (lm/model/mixers/mla.py), with
DeepSeek's interleaved RoPE pairs and YaRN's mscale on the softmax scale.

The first `first_k_dense_replace` layers are dense, the rest Mixture-of-Experts with the sigmoid
router (a correction bias for the choice only, group-limited top-k, routed scaling) and
`n_shared_experts` shared experts, as GLM-4.5 has them (lm/io/families/glm4_moe.py holds that
table).
"""

from __future__ import annotations

from lm.config import mla_enabled, n_experts
from lm.io.families import common, glm4_moe

LAYER = common.LAYER
# MLA's projections beyond Llama's (q for q_lora_rank 0, o): lm module -> HF module.
MODULES = {'layers.attn.q_a': LAYER + 'self_attn.q_a_proj',
           'layers.attn.q_b': LAYER + 'self_attn.q_b_proj',
           'layers.attn.kv_a': LAYER + 'self_attn.kv_a_proj_with_mqa',
           'layers.attn.kv_b': LAYER + 'self_attn.kv_b_proj'}
# transformers' DeepseekV3Config defaults, used where config.json leaves a key out.
DEFAULT_FIRST_DENSE = 3
DEFAULT_ROPE_INTERLEAVE = True


def to_lm(hf: dict) -> dict:
  L = hf['num_hidden_layers']
  dense = min(hf.get('first_k_dense_replace', DEFAULT_FIRST_DENSE) or 0, L)
  common.require_silu(hf, 'DeepseekV3ForCausalLM')
  full, _ = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  D, H = hf['hidden_size'], hf['num_attention_heads']
  N, P = hf['qk_nope_head_dim'], hf['qk_rope_head_dim']
  bias = bool(hf.get('attention_bias'))
  mla = dict(kv_lora_rank=hf['kv_lora_rank'], q_lora_rank=hf.get('q_lora_rank') or 0,
             qk_nope_head_dim=N, qk_rope_head_dim=P, v_head_dim=hf['v_head_dim'])
  # MLA has no grouped K/V heads and no head_dim of its own: n_kv_heads = n_heads, and head_dim
  # the query/key width, so lm's per-head rules read a real size.
  fields = dict(common.llama_fields(hf), n_kv_heads=H, head_dim=0 if N + P == D // H else N + P,
                norm_eps=float(hf.get('rms_norm_eps', 1e-6)), rope_theta=theta,
                rope_scaling=scaling, qkv_bias=bias, attn_out_bias=bias, mla=mla,
                rope_interleaved=bool(hf.get('rope_interleave', DEFAULT_ROPE_INTERLEAVE)),
                hf_family='deepseek_v3')
  if dense < L:  # the MoE layers as GLM-4.5 reads them
    fields.update(glm4_moe.moe_fields(hf, dense))
  return fields


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, 'deepseek_v3', 'DeepseekV3ForCausalLM')
  del out['head_dim']  # DeepseekV3Config sets it to qk_rope_head_dim itself
  a = m.mla
  out.update(num_key_value_heads=m.n_heads, kv_lora_rank=a.kv_lora_rank,
             q_lora_rank=a.q_lora_rank or None, qk_nope_head_dim=a.qk_nope_head_dim,
             qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
             rope_interleave=bool(m.rope_interleaved), attention_bias=bool(m.qkv_bias),
             first_k_dense_replace=m.n_layers)
  if n_experts(m):
    out.update(glm4_moe.moe_hf_config(m))
  return out


def tensors(m, shapes: dict) -> dict:
  table = common.llama_tensors(shapes, modules=MODULES)
  table.update(glm4_moe.moe_tensors(m, shapes))
  norms = {'layers.attn.q_a_norm.scale': LAYER + 'self_attn.q_a_layernorm.weight',
           'layers.attn.kv_a_norm.scale': LAYER + 'self_attn.kv_a_layernorm.weight'}
  table.update({n: (hf, 0, None) for n, hf in norms.items() if n in shapes})
  return table


def unfit(m) -> str | None:
  if n_experts(m):
    field = glm4_moe.moe_unfit(m)
    if field:
      return field
  checks = {'mla': mla_enabled(m), 'norm_placement': m.norm_placement == 'pre',
            'qk_norm': not m.qk_norm, 'norm_offset': m.norm_offset == 0.0,
            'embed_scale': not m.embed_scale, 'mlp_activation': m.mlp_activation == 'silu',
            'attn_output_gate': not m.attn_output_gate, 'mlp_bias': not m.mlp_bias,
            'partial_rotary_factor': m.partial_rotary_factor == 1.0,
            'qkv_bias': m.qkv_bias == m.attn_out_bias,
            'layer_types': set(m.layer_types) <= {'full'}, 'sliding_window': not m.sliding_window,
            'rope_layers': all(m.rope_layers), 'rope_local_theta': not m.rope_local_theta,
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap, 'attn_sinks': not m.attn_sinks,
            'qk_l2_norm': not m.qk_l2_norm,
            'attn_temperature_floor_scale': not m.attn_temperature_floor_scale,
            'final_logit_softcap': not m.final_logit_softcap}
  return next((field for field, ok in checks.items() if not ok), None)


FAMILY = common.Family('deepseek_v3', 'DeepseekV3ForCausalLM', to_lm, to_hf, tensors, unfit,
                       modules=MODULES)
