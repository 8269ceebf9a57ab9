"""Qwen3.5-MoE text (`Qwen3_5MoeForCausalLM`, model_type qwen3_5_moe_text): Qwen3.5's hybrid stack
(gated DeltaNet and gated full attention, lm/io/families/qwen3_5.py, its DeltaNet projections one
per tensor) with Qwen3-Next's Mixture-of-Experts in every layer: softmax top-k routing and one
shared expert scaled by sigmoid(x · w) (lm/io/families/qwen3_next.py holds that table).
"""

from __future__ import annotations

from lm.io.families import common, qwen3_5, qwen3_next

FAMILY_NAME, ARCHITECTURE = 'qwen3_5_moe_text', 'Qwen3_5MoeForCausalLM'


def to_lm(hf: dict) -> dict:
  fields = qwen3_5.to_lm(hf)
  fields.update(hf_family=FAMILY_NAME, moe=qwen3_next.moe_fields(hf))
  return fields


def to_hf(m) -> dict:
  out = qwen3_5.to_hf(m)
  moe = m.moe
  out.update(architectures=[ARCHITECTURE], model_type=FAMILY_NAME,
             num_experts=moe.n_experts, num_experts_per_tok=moe.experts_per_token,
             moe_intermediate_size=moe.expert_dim or m.mlp_dim,
             shared_expert_intermediate_size=moe.shared_dim, output_router_logits=False,
             router_aux_loss_coef=moe.aux_loss_weight)
  return out


def tensors(m, shapes: dict) -> dict:
  table = qwen3_5.tensors(m, shapes)
  table.update(qwen3_next.moe_tensors(shapes))
  return table


def unfit(m) -> str | None:
  if not m.moe.n_experts:
    return 'moe.n_experts'  # every layer has experts; a dense stack is Qwen3.5
  return qwen3_5.unfit(m, allow=('moe.n_experts',)) or qwen3_next.moe_unfit(m)


FAMILY = common.Family(FAMILY_NAME, ARCHITECTURE, to_lm, to_hf, tensors, unfit,
                       modules=qwen3_5.LINEAR_MODULES)
