"""Qwen3-Next (`Qwen3NextForCausalLM`, model_type qwen3_next): Qwen3.5's hybrid stack (gated
DeltaNet 'linear_attention' layers and gated full attention with partial RoPE, (1 + weight)
norms) with Mixture-of-Experts channel mixers: softmax top-k routing and one shared expert whose
output is scaled by sigmoid(x · w) (lm/model/moe.py). Layers in `mlp_only_layers`, or off the
`decoder_sparse_step` grid, are dense.

Its DeltaNet projections are fused per key-head group (in_proj_qkvz, in_proj_ba): they map
through lm/model/mixers/gated_deltanet.py's `hf_tensors`; the attention's q_proj holds each head's
query and gate, as Qwen3.5's does.
"""

from __future__ import annotations

from lm.io.families import common, qwen3_5

FAMILY_NAME, ARCHITECTURE = 'qwen3_next', 'Qwen3NextForCausalLM'
MOE = common.LAYER + 'mlp.'


def _mlp_types(hf: dict) -> tuple:
  L, step = hf['num_hidden_layers'], hf.get('decoder_sparse_step', 1)
  dense = set(hf.get('mlp_only_layers') or [])
  return tuple('moe' if i not in dense and hf.get('num_experts', 0) > 0 and (i + 1) % step == 0
               else 'dense' for i in range(L))


def moe_fields(hf: dict) -> dict:
  """lm's `model.moe` for Qwen3-Next's and Qwen3.5-MoE's experts and gated shared expert."""
  return dict(n_experts=int(hf.get('num_experts', 0)),
              experts_per_token=int(hf['num_experts_per_tok']),
              expert_dim=int(hf['moe_intermediate_size']), router='softmax',
              norm_topk_prob=bool(hf.get('norm_topk_prob', True)),
              shared_dim=int(hf.get('shared_expert_intermediate_size') or 0),
              shared_gate=bool(hf.get('shared_expert_intermediate_size')))


def to_lm(hf: dict) -> dict:
  fields = qwen3_5.to_lm(hf)
  types = _mlp_types(hf)
  fields.update(hf_family=FAMILY_NAME, mlp_types=types if len(set(types)) > 1 else (),
                moe=moe_fields(hf))
  if set(types) == {'dense'}:
    fields['moe'] = dict(n_experts=0)
  return fields


def to_hf(m) -> dict:
  out = qwen3_5.to_hf(m)
  moe = m.moe
  types = tuple(m.mlp_types) or (('moe' if moe.n_experts else 'dense'),) * m.n_layers
  out.update(architectures=[ARCHITECTURE], model_type=FAMILY_NAME,
             num_experts=moe.n_experts, num_experts_per_tok=moe.experts_per_token,
             moe_intermediate_size=moe.expert_dim or m.mlp_dim,
             shared_expert_intermediate_size=moe.shared_dim, norm_topk_prob=bool(moe.norm_topk_prob),
             decoder_sparse_step=1, mlp_only_layers=[i for i, t in enumerate(types) if t == 'dense'],
             output_router_logits=False, router_aux_loss_coef=moe.aux_loss_weight)
  return out


def moe_tensors(shapes: dict) -> dict:
  """The router, the experts (one HF tensor per expert) and the gated shared expert."""
  table = {'layers.moe.router': (MOE + 'gate.weight', 1, None),
           'layers.moe.shared_gate': (MOE + 'shared_expert_gate.weight', 1, None)}
  for lm_name, hf_name in (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj')):
    table[f'layers.moe.{lm_name}.kernel'] = (MOE + 'experts.{e}.' + hf_name + '.weight', 1, None)
    table[f'layers.moe.shared.{lm_name}.kernel'] = (MOE + 'shared_expert.' + hf_name + '.weight',
                                                    1, None)
  return {k: v for k, v in table.items() if k in shapes}


def tensors(m, shapes: dict) -> dict:
  table = qwen3_5.attention_tensors(m, shapes)
  if m.layer_types and 'linear' in m.layer_types:
    table.update(qwen3_5.linear_attention_tensors(m, FAMILY_NAME))
  table.update(moe_tensors(shapes))
  return {k: v for k, v in table.items() if not isinstance(k, str) or k in shapes}


def moe_unfit(m) -> str | None:
  moe = m.moe
  checks = {'moe.router': not moe.n_experts or moe.router == 'softmax',
            'moe.shared_gate': not moe.n_experts or bool(moe.shared_gate) == bool(moe.shared_dim),
            'moe.router_bias': not moe.router_bias, 'moe.expert_bias': not moe.expert_bias,
            'moe.swiglu_limit': not moe.swiglu_limit,
            'moe.routed_scaling_factor': moe.routed_scaling_factor == 1.0}
  return next((f for f, ok in checks.items() if not ok), None)


def unfit(m) -> str | None:
  return qwen3_5.unfit(m, allow=('mlp_types', 'moe.n_experts')) or moe_unfit(m)


FAMILY = common.Family(FAMILY_NAME, ARCHITECTURE, to_lm, to_hf, tensors, unfit,
                       modules={'layers.linear_attn.o': qwen3_5.LINEAR + 'out_proj'})
