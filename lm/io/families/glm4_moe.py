"""GLM-4.5 (model_type glm4_moe): Llama-shaped attention with q/k/v biases (none on o), optional
per-head q/k norm, RoPE on the first half of each head (rotate-half, `partial_rotary_factor`
0.5 by default), the first `first_k_dense_replace` layers dense and the rest Mixture-of-Experts
with DeepSeek-V3's router (sigmoid scores, a correction bias for the choice only, group-limited
top-k, routed scaling) plus `n_shared_experts` shared experts, which transformers builds as one
MLP n times as wide.

Real checkpoints carry next-token-prediction layers past num_hidden_layers
(num_nextn_predict_layers); transformers skips them and so does lm (`ignored`)."""

from __future__ import annotations

from lm.io.families import common

LAYER = common.LAYER
MOE = LAYER + 'mlp.'


def to_lm(hf: dict) -> dict:
  common.require_silu(hf, 'Glm4MoeForCausalLM')
  full, _ = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  L = hf['num_hidden_layers']
  first_dense = min(int(hf.get('first_k_dense_replace', 1)), L)
  prf = full.get('partial_rotary_factor', hf.get('partial_rotary_factor', 0.5))
  return dict(common.llama_fields(hf), rope_theta=theta, rope_scaling=scaling,
              norm_eps=float(hf.get('rms_norm_eps', 1e-5)), partial_rotary_factor=float(prf),
              qkv_bias=bool(hf.get('attention_bias')), attn_out_bias=False,
              qk_norm=bool(hf.get('use_qk_norm')),
              **moe_fields(hf, first_dense), hf_family='glm4_moe')


def moe_fields(hf: dict, first_dense: int) -> dict:
  """`mlp_types` (dense, then MoE) and `moe` of the DeepSeek-V3 / GLM-4.5 MoE layers."""
  L, F = hf['num_hidden_layers'], hf.get('moe_intermediate_size', 1408)
  E = int(hf.get('n_routed_experts', hf.get('num_local_experts', 128)))
  moe = dict(n_experts=E, experts_per_token=int(hf.get('num_experts_per_tok', 8)), expert_dim=F,
             router='sigmoid', n_group=int(hf.get('n_group', 1)),
             topk_group=int(hf.get('topk_group', 1)),
             routed_scaling_factor=float(hf.get('routed_scaling_factor', 1.0)),
             norm_topk_prob=bool(hf.get('norm_topk_prob', True)),
             shared_dim=F * int(hf.get('n_shared_experts', 1)))
  return dict(mlp_types=('dense',) * first_dense + ('moe',) * (L - first_dense), moe=moe)


def _first_dense(m) -> int:
  types = tuple(m.mlp_types) or ('moe',) * m.n_layers
  return types.index('moe') if 'moe' in types else m.n_layers


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, 'glm4_moe', 'Glm4MoeForCausalLM')
  out['rope_parameters']['partial_rotary_factor'] = m.partial_rotary_factor
  out.update(attention_bias=bool(m.qkv_bias), use_qk_norm=bool(m.qk_norm), **moe_hf_config(m))
  return out


def moe_hf_config(m) -> dict:
  """config.json's MoE keys of DeepSeek-V3 / GLM-4.5."""
  moe = m.moe
  return dict(first_k_dense_replace=_first_dense(m), moe_intermediate_size=moe.expert_dim or m.mlp_dim,
              n_routed_experts=moe.n_experts, num_experts_per_tok=moe.experts_per_token,
              n_shared_experts=moe.shared_dim // (moe.expert_dim or m.mlp_dim), n_group=moe.n_group,
              topk_group=moe.topk_group, routed_scaling_factor=moe.routed_scaling_factor,
              norm_topk_prob=bool(moe.norm_topk_prob), num_nextn_predict_layers=0,
              output_router_logits=False)


def tensors(m, shapes: dict) -> dict:
  table = common.llama_tensors(shapes)
  table.update(moe_tensors(m, shapes))
  return table


def moe_tensors(m, shapes: dict) -> dict:
  """The router, its correction bias, the routed experts and the shared ones (DeepSeek-V3, GLM-4.5)."""
  del m
  table = {}
  table.update({
      'layers.moe.router': (MOE + 'gate.weight', 1, None),
      'layers.moe.correction_bias': (MOE + 'gate.e_score_correction_bias', 0, None)})
  for lm_name, hf_name in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
    table[f'layers.moe.{lm_name}.kernel'] = (MOE + 'experts.{e}.' + hf_name + '.weight', 1, None)
    table[f'layers.moe.shared.{lm_name}.kernel'] = (MOE + 'shared_experts.' + hf_name + '.weight',
                                                    1, None)
  return {k: v for k, v in table.items() if k in shapes}


def moe_unfit(m) -> str | None:
  """The first MoE field DeepSeek-V3 / GLM-4.5's MoE layers cannot express, or None."""
  moe, F = m.moe, m.moe.expert_dim or m.mlp_dim
  types = tuple(m.mlp_types) or ('moe',) * m.n_layers
  first = _first_dense(m)
  checks = {'moe.n_experts': bool(moe.n_experts), 'moe.router': moe.router == 'sigmoid',
            'mlp_types': types == ('dense',) * first + ('moe',) * (m.n_layers - first),
            'moe.shared_dim': moe.shared_dim > 0 and moe.shared_dim % F == 0,
            'moe.shared_gate': not moe.shared_gate, 'moe.router_bias': not moe.router_bias,
            'moe.expert_bias': not moe.expert_bias, 'moe.swiglu_limit': not moe.swiglu_limit}
  return next((field for field, ok in checks.items() if not ok), None)


def unfit(m) -> str | None:
  field = moe_unfit(m)
  if field:
    return field
  checks = {'norm_placement': m.norm_placement == 'pre', 'qk_norm_scope': m.qk_norm_scope == 'head',
            'norm_offset': m.norm_offset == 0.0, 'embed_scale': not m.embed_scale,
            'mlp_activation': m.mlp_activation == 'silu', 'attn_output_gate': not m.attn_output_gate,
            'attn_out_bias': not m.attn_out_bias, 'mlp_bias': not m.mlp_bias,
            'layer_types': set(m.layer_types) <= {'full'}, 'sliding_window': not m.sliding_window,
            'rope_layers': not m.rope_layers, 'rope_local_theta': not m.rope_local_theta,
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap,
            # GLM-4.5 rotates the two halves of its rotary dims, unlike dense GLM-4's pairs.
            'rope_interleaved': not m.get('rope_interleaved'), 'attn_sinks': not m.get('attn_sinks'),
            'qk_l2_norm': not m.get('qk_l2_norm')}
  return next((field for field, ok in checks.items() if not ok), None)


def ignored(m) -> str:
  """The layers past the model's own: the next-token-prediction layers."""
  own = '|'.join(str(i) for i in range(m.n_layers))
  return rf'model\.layers\.(?!(?:{own})\.)\d+\.'


# transformers fuses the checkpoint's per-expert tensors into mlp.experts.{gate_up_proj, down_proj}.
FAMILY = common.Family('glm4_moe', 'Glm4MoeForCausalLM', to_lm, to_hf, tensors, unfit,
                       ignored=ignored, experts=MOE + 'experts')
