"""gpt-oss (`GptOssForCausalLM`, model_type gpt_oss): attention with q/k/v/o biases and a learned
sink logit per head (`attn_sinks`), sliding-window and full layers alternating, YaRN RoPE; every
layer a Mixture-of-Experts with a biased router (top-k of the logits, then a softmax over those k),
expert biases and the clamped SwiGLU ((clip(up) + 1) · g · sigmoid(alpha · g), g clipped above).

HF holds each layer's experts in one tensor: `gate_up_proj` [E, D, 2F] with gate and up columns
interleaved (gate at even, up at odd), `down_proj` [E, F, D], and their biases. Published
checkpoints store the expert weights in MXFP4; the reader dequantizes them (lm/io/mxfp4.py).
"""

from __future__ import annotations

import numpy as np

from lm.io.families import common

FAMILY_NAME, ARCHITECTURE = 'gpt_oss', 'GptOssForCausalLM'
EXPERTS = common.LAYER + 'mlp.experts.'


def to_lm(hf: dict) -> dict:
  L = hf['num_hidden_layers']
  types = common.layer_types_from_hf(hf) or tuple(
      'sliding' if (i + 1) % 2 else 'full' for i in range(L))
  full, _ = common.rope_params(hf)
  theta, scaling = common.rope_from_hf(full, hf)
  bias = bool(hf.get('attention_bias', True))
  window = int(hf.get('sliding_window') or 0) if 'sliding' in types else 0
  return dict(common.llama_fields(hf), norm_eps=float(hf.get('rms_norm_eps', 1e-5)),
              rope_theta=theta, rope_scaling=scaling, qkv_bias=bias, attn_out_bias=bias,
              attn_sinks=True, sliding_window=window,
              layer_types=types if len(set(types)) > 1 else (),
              moe=dict(n_experts=int(hf['num_local_experts']),
                       experts_per_token=int(hf.get('num_experts_per_tok', 4)),
                       expert_dim=int(hf['intermediate_size']), router='topk_softmax',
                       router_bias=True, expert_bias=True,
                       swiglu_limit=float(hf.get('swiglu_limit', 7.0)),
                       swiglu_alpha=float(hf.get('swiglu_alpha', 1.702))),
              hf_family=FAMILY_NAME)


def to_hf(m) -> dict:
  out = common.llama_hf_config(m, FAMILY_NAME, ARCHITECTURE)
  moe = m.moe
  out.update(attention_bias=bool(m.qkv_bias), sliding_window=m.sliding_window or None,
             layer_types=common.layer_types_to_hf(m), num_local_experts=moe.n_experts,
             num_experts_per_tok=moe.experts_per_token, intermediate_size=moe.expert_dim or m.mlp_dim,
             swiglu_limit=moe.swiglu_limit, swiglu_alpha=moe.swiglu_alpha,
             router_aux_loss_coef=moe.aux_loss_weight, output_router_logits=False)
  return out


def _gate_up(suffix: str) -> common.Custom:
  """gate_up_proj [E, D, 2F] (or its bias [E, 2F]), gate at even columns and up at odd ones <->
  the experts' gate and up ([E, D, F] kernels or [E, F] biases)."""
  def to_lm(w):
    return w[..., 0::2], w[..., 1::2]

  def to_hf(gate, up):
    return np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1])

  name = 'gate_up_proj' if suffix == 'kernel' else 'gate_up_proj_bias'
  return common.Custom(EXPERTS + name, (f'layers.moe.gate.{suffix}', f'layers.moe.up.{suffix}'),
                       to_lm, to_hf)


def tensors(m, shapes: dict) -> dict:
  del m
  table = common.llama_tensors(shapes)
  table.update({'layers.attn.sinks': (common.LAYER + 'self_attn.sinks', 0, None),
                'layers.moe.router': (common.LAYER + 'mlp.router.weight', 1, None),
                'layers.moe.router_bias': (common.LAYER + 'mlp.router.bias', 0, None),
                # One tensor per layer holds every expert: stacked over layers only.
                'layers.moe.down.kernel': (EXPERTS + 'down_proj', 0, None),
                'layers.moe.down.bias': (EXPERTS + 'down_proj_bias', 0, None)})
  table.update({entry.names: entry for entry in (_gate_up('kernel'), _gate_up('bias'))})
  return {k: v for k, v in table.items() if not isinstance(k, str) or k in shapes}


def unfit(m) -> str | None:
  moe = m.moe
  checks = {'moe.n_experts': bool(moe.n_experts), 'moe.router': moe.router == 'topk_softmax',
            'moe.router_bias': bool(moe.router_bias), 'moe.expert_bias': bool(moe.expert_bias),
            'moe.shared_dim': not moe.shared_dim, 'mlp_types': not m.mlp_types,
            'attn_sinks': bool(m.attn_sinks), 'qkv_bias': m.qkv_bias == m.attn_out_bias,
            'norm_placement': m.norm_placement == 'pre', 'qk_norm': not m.qk_norm,
            'norm_offset': m.norm_offset == 0.0, 'embed_scale': not m.embed_scale,
            'mlp_activation': m.mlp_activation == 'silu', 'attn_output_gate': not m.attn_output_gate,
            'partial_rotary_factor': m.partial_rotary_factor == 1.0,
            'layer_types': set(m.layer_types) <= {'sliding', 'full'},
            'rope_layers': not m.rope_layers, 'rope_interleaved': not m.rope_interleaved,
            'qk_l2_norm': not m.qk_l2_norm, 'rope_local_theta': not m.rope_local_theta,
            'query_pre_attn_scalar': not m.query_pre_attn_scalar,
            'attn_logit_softcap': not m.attn_logit_softcap,
            'final_logit_softcap': not m.final_logit_softcap}
  return next((field for field, ok in checks.items() if not ok), None)


FAMILY = common.Family(FAMILY_NAME, ARCHITECTURE, to_lm, to_hf, tensors, unfit)
