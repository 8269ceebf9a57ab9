"""llama.cpp GGUF checkpoints in and out, through the `gguf` package.

Import: a GGUF file (or a directory holding exactly one) works wherever a Hugging Face directory
does (`train.init_from`, `lm generate`, `lm eval`). The `{arch}.*` metadata gives the model's
shape, and what llama.cpp's graph for the architecture fixes in code (Gemma's +1 norms, GELU and
sandwich norms, its default softcaps, window and sliding-layer pattern, its attention scale) the
rest; tensors are dequantized on load (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) with
`gguf.dequantize`, one tensor at a time; the embedded tokenizer and chat template are read by
lm/data/gguf_tokenizer.py.

Layouts: GGUF stores a linear weight with ne = [in, out], which numpy reads as [out, in], the
Hugging Face layout, so lm/io/hf.py's reshapes apply once names are mapped. llama.cpp's converter
permutes the q and k rows of Llama-architecture models from HF's rotate-half RoPE to the
interleaved pairs its rope kernel uses (`permute` in convert_hf_to_gguf.py); import undoes it and
export redoes it. Qwen2/3, Gemma 2/3 and Phi-3 use rotate-half ("NEOX") RoPE in llama.cpp too and
are not permuted. llama.cpp multiplies by a norm's weight as stored, so Gemma's norms (x * (1 + w)
in HF and lm) are stored as 1 + w; Phi-3's q/k/v and gate/up are the fused attn_qkv and ffn_up,
as its HF checkpoint holds them.

Export writes F16 or Q8_0 (norms and biases stay F32, as llama.cpp does) with the run's tokenizer
and chat template, to a temporary file renamed into place, so a failed export leaves nothing. A
model that llama.cpp's graph would compute differently (EXPORT_LIMITS) is refused before anything
is written. Export-only (lm does not read them back): Qwen3.5, Qwen3.5-MoE and Qwen3-Next
(qwen35, qwen35moe, qwen3next), whose gated DeltaNet tensors are written as llama.cpp's converter
writes them (HF_RESHAPED: A as -exp(A_log), the conv [channels, W] in F32, q/k/v fused as
attn_qkv and z as attn_gate, qwen35's value heads tiled for its broadcast), and Gemma 4 text
(gemma4: per-layer heads and KV heads, KV-shared layers without k/v, per-layer input embeddings,
full layers' proportional RoPE as rope_freqs divisors; the MoE block with its experts' gate and up
one tensor, the router's input and per-expert scales as ffn_gate_inp.scale and
ffn_down_exps.scale).
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from lm.config import head_dim, n_experts
from lm.data import gguf_tokenizer
from lm.errors import CheckpointError, ConfigError
from lm.io import hf
from lm.io.families.common import LAYER, Custom
from lm.model import stack as stack_lib
from lm.model.rope import rotary_dim

ARCHITECTURES = ('llama', 'qwen2', 'qwen3', 'qwen3moe', 'gemma2', 'gemma3', 'phi3', 'smollm3',
                 'olmo2')
# lm's Hugging Face family -> llama.cpp architecture (Mixtral is llama's graph with experts; OLMo 3
# is olmo2's graph with sliding windows).
ARCH_OF = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'mixtral': 'llama',
           'qwen3_moe': 'qwen3moe', 'gemma2': 'gemma2', 'gemma3_text': 'gemma3', 'phi3': 'phi3',
           'smollm3': 'smollm3', 'olmo2': 'olmo2', 'olmo3': 'olmo2', 'gpt_oss': 'gpt-oss',
           'deepseek_v3': 'deepseek2', 'glm4_moe': 'glm4moe', 'llama4_text': 'llama4',
           'qwen3_5_text': 'qwen35', 'qwen3_5_moe_text': 'qwen35moe', 'qwen3_next': 'qwen3next',
           'gemma4_text': 'gemma4'}
# llama.cpp architecture -> lm's family for its dense models (llama with experts is Mixtral,
# olmo2 with a sliding window OLMo 3).
FAMILY_OF = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'qwen3moe': 'qwen3_moe',
             'gemma2': 'gemma2', 'gemma3': 'gemma3_text', 'phi3': 'phi3', 'smollm3': 'smollm3',
             'olmo2': 'olmo2'}
# GGUF holds each layer's experts as one [n_expert, out, in] tensor; HF (and lm's readers) name
# one tensor per expert. GGUF name -> the HF per-expert template, per family; the router too.
EXPERT_NAMES = {
    'mixtral': {'blk.{i}.ffn_gate_inp.weight': 'model.layers.{i}.block_sparse_moe.gate.weight',
                'blk.{i}.ffn_gate_exps.weight': 'model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight',
                'blk.{i}.ffn_up_exps.weight': 'model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight',
                'blk.{i}.ffn_down_exps.weight': 'model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight'},
    'qwen3_moe': {'blk.{i}.ffn_gate_inp.weight': 'model.layers.{i}.mlp.gate.weight',
                  'blk.{i}.ffn_gate_exps.weight': 'model.layers.{i}.mlp.experts.{e}.gate_proj.weight',
                  'blk.{i}.ffn_up_exps.weight': 'model.layers.{i}.mlp.experts.{e}.up_proj.weight',
                  'blk.{i}.ffn_down_exps.weight': 'model.layers.{i}.mlp.experts.{e}.down_proj.weight'},
}
# lm parameter -> (GGUF name, one layer's lm array -> GGUF numpy order), for weights whose HF
# tensor holds several lm parameters or is laid out unlike a linear layer's.
BY_LM_NAME = {
    'gpt_oss': {'layers.moe.gate.kernel': (('blk.{i}.ffn_gate_exps.weight', lambda a, m: _experts_t(a)),),
                'layers.moe.up.kernel': (('blk.{i}.ffn_up_exps.weight', lambda a, m: _experts_t(a)),),
                'layers.moe.down.kernel': (('blk.{i}.ffn_down_exps.weight', lambda a, m: _experts_t(a)),),
                'layers.moe.gate.bias': (('blk.{i}.ffn_gate_exps.bias', lambda a, m: a),),
                'layers.moe.up.bias': (('blk.{i}.ffn_up_exps.bias', lambda a, m: a),)},
    'llama4_text': {'layers.moe.gate.kernel': (('blk.{i}.ffn_gate_exps.weight', lambda a, m: _experts_t(a)),),
                    'layers.moe.up.kernel': (('blk.{i}.ffn_up_exps.weight', lambda a, m: _experts_t(a)),),
                    'layers.moe.down.kernel': (('blk.{i}.ffn_down_exps.weight', lambda a, m: _experts_t(a)),)},
    # MLA's kv_b [C, H, N + V] as llama.cpp's absorbed attention uses it, split per head: k_b
    # [H, C, N] (it maps a query's nope part into latent space) and v_b [H, V, C].
    'deepseek_v3': {'layers.attn.kv_b.kernel': (
        ('blk.{i}.attn_k_b.weight', lambda a, m: _kv_b(a, m)[0]),
        ('blk.{i}.attn_v_b.weight', lambda a, m: _kv_b(a, m)[1]))},
}
EXPERT_NAMES.update({family: EXPERT_NAMES['qwen3_moe'] for family in
                     ('deepseek_v3', 'glm4_moe', 'qwen3_next', 'qwen3_5_moe_text')})
TENSOR_TYPES = ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K')
EXPORT_DTYPES = ('f16', 'q8_0')

# GGUF tensor name -> HF tensor name ({i}: layer index).
NAMES = {
    'token_embd.weight': 'model.embed_tokens.weight',
    'output_norm.weight': 'model.norm.weight',
    'output.weight': 'lm_head.weight',
    'blk.{i}.attn_norm.weight': 'model.layers.{i}.input_layernorm.weight',
    'blk.{i}.ffn_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.attn_q.weight': 'model.layers.{i}.self_attn.q_proj.weight',
    'blk.{i}.attn_k.weight': 'model.layers.{i}.self_attn.k_proj.weight',
    'blk.{i}.attn_v.weight': 'model.layers.{i}.self_attn.v_proj.weight',
    'blk.{i}.attn_output.weight': 'model.layers.{i}.self_attn.o_proj.weight',
    'blk.{i}.attn_q.bias': 'model.layers.{i}.self_attn.q_proj.bias',
    'blk.{i}.attn_k.bias': 'model.layers.{i}.self_attn.k_proj.bias',
    'blk.{i}.attn_v.bias': 'model.layers.{i}.self_attn.v_proj.bias',
    'blk.{i}.ffn_gate.weight': 'model.layers.{i}.mlp.gate_proj.weight',
    'blk.{i}.ffn_up.weight': 'model.layers.{i}.mlp.up_proj.weight',
    'blk.{i}.ffn_down.weight': 'model.layers.{i}.mlp.down_proj.weight',
    'blk.{i}.attn_output.bias': 'model.layers.{i}.self_attn.o_proj.bias',
    'blk.{i}.attn_q_norm.weight': 'model.layers.{i}.self_attn.q_norm.weight',  # Qwen3
    'blk.{i}.attn_k_norm.weight': 'model.layers.{i}.self_attn.k_norm.weight',
}
# Where a family's names differ from NAMES. Gemma's sandwich norms: llama.cpp's ffn_norm is the
# norm before the MLP (HF pre_feedforward_layernorm), and HF's post_attention_layernorm is the
# norm after attention. Phi-3's fused projections keep their HF layout under one GGUF name each.
SANDWICH_NAMES = {
    'blk.{i}.ffn_norm.weight': 'model.layers.{i}.pre_feedforward_layernorm.weight',
    'blk.{i}.post_attention_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.post_ffw_norm.weight': 'model.layers.{i}.post_feedforward_layernorm.weight',
}
# OLMo 2/3 norm after each part only: no ffn_norm (None drops a NAMES entry).
POST_NAMES = {
    'blk.{i}.attn_norm.weight': None, 'blk.{i}.ffn_norm.weight': None,
    'blk.{i}.post_attention_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.post_ffw_norm.weight': 'model.layers.{i}.post_feedforward_layernorm.weight',
}
# gpt-oss: its norm before the experts is post_attention_norm; sinks, a biased router, and the
# experts as HF stores them whole (gate/up interleaved, down [E, F, D]) go by lm name below.
GPT_OSS_NAMES = {
    'blk.{i}.ffn_norm.weight': None,
    'blk.{i}.post_attention_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.attn_sinks.weight': 'model.layers.{i}.self_attn.sinks',
    'blk.{i}.ffn_gate_inp.weight': 'model.layers.{i}.mlp.router.weight',
    'blk.{i}.ffn_gate_inp.bias': 'model.layers.{i}.mlp.router.bias',
    'blk.{i}.ffn_down_exps.bias': 'model.layers.{i}.mlp.experts.down_proj_bias',
}
# DeepSeek-V3 and GLM-4.5's MoE layers: the router with its selection bias, the shared experts.
V3_MOE_NAMES = {
    'blk.{i}.ffn_gate_inp.weight': 'model.layers.{i}.mlp.gate.weight',
    'blk.{i}.exp_probs_b.bias': 'model.layers.{i}.mlp.gate.e_score_correction_bias',
    'blk.{i}.ffn_gate_shexp.weight': 'model.layers.{i}.mlp.shared_experts.gate_proj.weight',
    'blk.{i}.ffn_up_shexp.weight': 'model.layers.{i}.mlp.shared_experts.up_proj.weight',
    'blk.{i}.ffn_down_shexp.weight': 'model.layers.{i}.mlp.shared_experts.down_proj.weight',
}
# Llama 4's MLPs are `feed_forward`; its experts (gate/up halves in one tensor) go by lm name.
FF = 'model.layers.{i}.feed_forward.'
LLAMA4_NAMES = {
    'blk.{i}.ffn_gate.weight': FF + 'gate_proj.weight', 'blk.{i}.ffn_up.weight': FF + 'up_proj.weight',
    'blk.{i}.ffn_down.weight': FF + 'down_proj.weight',
    'blk.{i}.ffn_gate_inp.weight': FF + 'router.weight',
    'blk.{i}.ffn_gate_shexp.weight': FF + 'shared_expert.gate_proj.weight',
    'blk.{i}.ffn_up_shexp.weight': FF + 'shared_expert.up_proj.weight',
    'blk.{i}.ffn_down_shexp.weight': FF + 'shared_expert.down_proj.weight',
}
MLA_NAMES = {
    'blk.{i}.attn_q_a.weight': 'model.layers.{i}.self_attn.q_a_proj.weight',
    'blk.{i}.attn_q_a_norm.weight': 'model.layers.{i}.self_attn.q_a_layernorm.weight',
    'blk.{i}.attn_q_b.weight': 'model.layers.{i}.self_attn.q_b_proj.weight',
    'blk.{i}.attn_kv_a_mqa.weight': 'model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight',
    'blk.{i}.attn_kv_a_norm.weight': 'model.layers.{i}.self_attn.kv_a_layernorm.weight',
}
# Qwen3.5 / Qwen3-Next: the norm before the MLP is post_attention_norm; the MoE's router and
# experts are Qwen3-MoE's (EXPERT_NAMES), its shared expert and that expert's sigmoid gate below.
# The DeltaNet's tensors are reshaped on the way (HF_RESHAPED).
QWEN_MOE = 'model.layers.{i}.mlp.'
HYBRID_NAMES = {
    'blk.{i}.ffn_norm.weight': None,
    'blk.{i}.post_attention_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight',
    'blk.{i}.ffn_gate_shexp.weight': QWEN_MOE + 'shared_expert.gate_proj.weight',
    'blk.{i}.ffn_up_shexp.weight': QWEN_MOE + 'shared_expert.up_proj.weight',
    'blk.{i}.ffn_down_shexp.weight': QWEN_MOE + 'shared_expert.down_proj.weight',
}
# Gemma 4: Gemma 3's sandwich norms, and the per-layer input embeddings (its table, its projection
# of the token embedding and that projection's norm; per layer the gate, the projection and the
# norm after it) and the layer scalar. Its MoE block (26B-A4B) as llama.cpp's converter writes it
# (conversion/gemma.py): the dense MLP (the shared expert) keeps ffn_gate/up/down, with ffn_norm
# before it and post_ffw_norm_1 after; the experts' norms are pre_ffw_norm_2 and post_ffw_norm_2;
# the router's input scale is ffn_gate_inp.scale, its per-expert scales ffn_down_exps.scale (the
# graph multiplies each expert's output by its own); the experts' gate and up one tensor as HF's.
GEMMA4_NAMES = {
    **SANDWICH_NAMES,
    'blk.{i}.ffn_gate_inp.weight': LAYER + 'router.proj.weight',
    'blk.{i}.ffn_gate_inp.scale': LAYER + 'router.scale',
    'blk.{i}.ffn_down_exps.scale': LAYER + 'router.per_expert_scale',
    'blk.{i}.ffn_gate_up_exps.weight': LAYER + 'experts.gate_up_proj',
    'blk.{i}.ffn_down_exps.weight': LAYER + 'experts.down_proj',
    'blk.{i}.post_ffw_norm_1.weight': LAYER + 'post_feedforward_layernorm_1.weight',
    'blk.{i}.pre_ffw_norm_2.weight': LAYER + 'pre_feedforward_layernorm_2.weight',
    'blk.{i}.post_ffw_norm_2.weight': LAYER + 'post_feedforward_layernorm_2.weight',
    'per_layer_token_embd.weight': 'model.embed_tokens_per_layer.weight',
    'per_layer_model_proj.weight': 'model.per_layer_model_projection.weight',
    'per_layer_proj_norm.weight': 'model.per_layer_projection_norm.weight',
    'blk.{i}.inp_gate.weight': 'model.layers.{i}.per_layer_input_gate.weight',
    'blk.{i}.proj.weight': 'model.layers.{i}.per_layer_projection.weight',
    'blk.{i}.post_norm.weight': 'model.layers.{i}.post_per_layer_input_norm.weight',
    'blk.{i}.layer_output_scale.weight': 'model.layers.{i}.layer_scalar',
}
FAMILY_NAMES = {
    'gemma2': SANDWICH_NAMES, 'gpt_oss': GPT_OSS_NAMES, 'gemma4_text': GEMMA4_NAMES,
    'qwen3_5_text': HYBRID_NAMES, 'qwen3_5_moe_text': HYBRID_NAMES, 'qwen3_next': HYBRID_NAMES,
    'deepseek_v3': {**MLA_NAMES, **V3_MOE_NAMES},
    'llama4_text': LLAMA4_NAMES,
    # GLM-4.5's norm before the MLP is llama.cpp's post_attention_norm.
    'glm4_moe': {**V3_MOE_NAMES, 'blk.{i}.ffn_norm.weight': None,
                 'blk.{i}.post_attention_norm.weight': 'model.layers.{i}.post_attention_layernorm.weight'}, 'gemma3_text': SANDWICH_NAMES, 'olmo2': POST_NAMES, 'olmo3': POST_NAMES,
    'phi3': {'blk.{i}.attn_qkv.weight': 'model.layers.{i}.self_attn.qkv_proj.weight',
             'blk.{i}.ffn_up.weight': 'model.layers.{i}.mlp.gate_up_proj.weight'},
}

# What llama.cpp's Gemma graphs fix in code rather than read from metadata, as lm model fields
# (src/models/gemma2.cpp, gemma3.cpp): x * sqrt(d_model) embeddings, tanh-GELU, norms before and
# after attention and MLP, weights stored as 1 + w; Gemma 3 adds q/k RMSNorm.
GEMMA_FIELDS = dict(norm_offset=1.0, embed_scale=True, mlp_activation='gelu_tanh',
                    norm_placement='sandwich')
GRAPH_FIELDS = {'gemma2': GEMMA_FIELDS, 'gemma3': dict(GEMMA_FIELDS, qk_norm=True)}
# Sliding layers when the file gives no pattern: llama.cpp's set_swa_pattern(n) makes layer i
# sliding unless i % n == n - 1 (Gemma 2: every other layer, Gemma 3: five of each six).
SWA_PATTERN = {'gemma2': 2, 'gemma3': 6, 'olmo2': 4}
# llama.cpp's smollm3 graph rotates no layer i with (i + 1) % 4 == 0; no metadata key sets it.
SMOLLM3_NOPE_STEP = 4
# llama.cpp scales Gemma queries by head_dim ** -0.5, except for the layer count of each family's
# 27B model, where it uses (d_model // n_heads) ** -0.5 (what those checkpoints'
# query_pre_attn_scalar says); no metadata key sets it.
WIDE_LAYERS = {'gemma2': 46, 'gemma3': 62}
# The clamp and the gate's sigmoid scale llama.cpp's gpt-oss experts use (llama-graph.cpp's
# LLM_FFN_SWIGLU_OAI_MOE constants; no metadata key sets them).
GPT_OSS_SWIGLU = (7.0, 1.702)
# What llama.cpp's llama4 graph fixes for chunked models (src/models/llama4.cpp): the chunk, and
# the NoPE layers' query temperature 1 + scale * log(1 + floor((pos + 1) / floor)).
LLAMA4_FIXED = dict(chunk=8192, floor=8192.0, scale=0.1)
# Architectures whose graph rotates interleaved pairs (LLAMA_ROPE_TYPE_NORM): q/k rows permuted.
PERMUTED = ('llama', 'smollm3')
# Architectures whose graph requires output.weight: a tied model writes its embeddings there.
UNTIED = ('olmo2', 'gpt-oss')
# RoPE scaling each graph applies as lm computes it: Gemma 3 scales full layers only (linear, its
# 4B-27B checkpoints), sliding ones keep rope.freq_base_swa unscaled. Others: plain RoPE.
ROPE_SCALING = {'gemma3': ('linear',)}
# Tensors llama.cpp's kernels need in F32 whatever the export type (its converter forces them so):
# the DeltaNet's convolution (ggml_ssm_conv).
F32_TENSORS = ('.ssm_conv1d.',)


def _tiled(array, m, width: int, *, axis: int = 0, start: int = 0):
  """Value heads of a DeltaNet tensor (entries start.. of `axis`, `width` each) from grouped order
  (head g * R + r reads key head g; HF's and lm's) to the tiled order (r * G + g) llama.cpp's
  qwen35 graph broadcasts key heads in (conversion/qwen.py, _LinearAttentionVReorderBase)."""
  G, H = m.linear_attn.n_key_heads, m.linear_attn.n_value_heads
  a = np.moveaxis(array, axis, 0)
  v = a[start:]
  v = v.reshape(G, H // G, width, *v.shape[1:]).swapaxes(0, 1).reshape(v.shape)
  return np.moveaxis(np.concatenate([a[:start], v]), 0, axis)


def _grouped(array, m, width: int, *, axis: int = 0, start: int = 0):
  """Value heads as they are: Qwen3-Next's graph repeats key heads per group, as HF does."""
  del m, width, axis, start
  return array


def _qkvz(array, m):
  """Qwen3-Next's in_proj_qkvz (rows per key-head group g: q_g | k_g | v and z of g's R value
  heads) -> (attn_qkv rows: every q | every k | every v, attn_gate rows: every z)."""
  la = m.linear_attn
  G, K, RV = la.n_key_heads, la.key_head_dim, la.n_value_heads // la.n_key_heads * la.value_head_dim
  q, k, v, z = np.split(array.reshape(G, 2 * K + 2 * RV, -1), np.cumsum([K, K, RV]), axis=1)
  rows = lambda x: x.reshape(-1, array.shape[-1])
  return np.concatenate([rows(q), rows(k), rows(v)]), rows(z)


LINEAR = 'model.layers.{i}.linear_attn.'


def _deltanet_names(qwen35: bool) -> dict:
  """HF DeltaNet tensor -> ((GGUF name, HF array of one layer -> GGUF array), ...), as llama.cpp's
  converter writes them (conversion/qwen.py): A as -exp(A_log), dt_bias as ssm_dt.bias, the conv
  [channels, W], the gated norm as it is (lm's has no offset); qwen35's value heads tiled."""
  order = _tiled if qwen35 else _grouped
  V = lambda m: m.linear_attn.value_head_dim
  qk = lambda m: 2 * m.linear_attn.n_key_heads * m.linear_attn.key_head_dim  # rows before v's
  table = {
      LINEAR + 'conv1d.weight': (('blk.{i}.ssm_conv1d.weight',
                                  lambda a, m: order(a[:, 0, :], m, V(m), start=qk(m))),),
      LINEAR + 'A_log': (('blk.{i}.ssm_a', lambda a, m: -np.exp(order(a, m, 1))),),
      LINEAR + 'dt_bias': (('blk.{i}.ssm_dt.bias', lambda a, m: order(a, m, 1)),),
      LINEAR + 'norm.weight': (('blk.{i}.ssm_norm.weight', lambda a, m: a),),
      LINEAR + 'out_proj.weight': (('blk.{i}.ssm_out.weight',
                                    lambda a, m: order(a, m, V(m), axis=1)),),
      # [1, D] in HF; llama.cpp's graph takes the shared expert's gate as a vector.
      QWEN_MOE + 'shared_expert_gate.weight': (('blk.{i}.ffn_gate_inp_shexp.weight',
                                               lambda a, m: a.reshape(-1)),),
  }
  if qwen35:  # q, k and v one tensor, z, b and a one each
    table.update({
        LINEAR + 'in_proj_qkv.weight': (('blk.{i}.attn_qkv.weight',
                                         lambda a, m: order(a, m, V(m), start=qk(m))),),
        LINEAR + 'in_proj_z.weight': (('blk.{i}.attn_gate.weight', lambda a, m: order(a, m, V(m))),),
        LINEAR + 'in_proj_b.weight': (('blk.{i}.ssm_beta.weight', lambda a, m: order(a, m, 1)),),
        LINEAR + 'in_proj_a.weight': (('blk.{i}.ssm_alpha.weight', lambda a, m: order(a, m, 1)),)})
  else:  # Qwen3-Next: in_proj_qkvz split into q, k, v and z; in_proj_ba as it is
    table.update({
        LINEAR + 'in_proj_qkvz.weight': (('blk.{i}.attn_qkv.weight', lambda a, m: _qkvz(a, m)[0]),
                                         ('blk.{i}.attn_gate.weight', lambda a, m: _qkvz(a, m)[1])),
        LINEAR + 'in_proj_ba.weight': (('blk.{i}.ssm_ba.weight', lambda a, m: a),)})
  return table


# HF tensor (with {i}) -> ((GGUF name, HF array of one layer -> GGUF array), ...), per family:
# the tensors whose GGUF layout is not their HF one (taking precedence over names_of).
HF_RESHAPED = {'qwen3_5_text': _deltanet_names(True), 'qwen3_5_moe_text': _deltanet_names(True),
               'qwen3_next': _deltanet_names(False)}


def names_of(family: str | None) -> dict:
  """GGUF tensor name -> HF tensor name ({i}: layer index) for lm family `family`."""
  return {k: v for k, v in {**NAMES, **FAMILY_NAMES.get(family, {})}.items() if v is not None}


def find_file(path: str) -> str | None:
  """The GGUF file `path` names: the file itself, or the one .gguf in directory `path`."""
  if os.path.isfile(path):
    return path if path.endswith('.gguf') else None
  if os.path.isdir(path):
    files = sorted(glob.glob(os.path.join(path, '*.gguf')))
    if len(files) > 1:
      raise ConfigError(f'{path} holds {len(files)} .gguf files ({", ".join(map(os.path.basename, files))}); '
                        'name one of them')
    return files[0] if files else None
  return None


def _reader(path: str):
  """The file's parsed header, shared with the tokenizer (gguf_tokenizer.reader keeps the last one)."""
  return gguf_tokenizer.reader(path, CheckpointError)


def _value(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def is_gguf(path: str) -> bool:
  """Whether `path` is a GGUF file (its magic), so an export may replace it."""
  try:
    with open(path, 'rb') as f:
      return f.read(4) == b'GGUF'
  except OSError:
    return False


def read_metadata(path: str) -> dict:
  """{key: value} of the file's model metadata (`general.*` and `{arch}.*`; not the vocabulary)."""
  reader = _reader(path)
  return {k: f.contents() for k, f in reader.fields.items()
          if not k.startswith(('GGUF.', 'tokenizer.'))}


def model_config(path: str) -> dict:
  """lm `model` fields from a GGUF file's metadata and tensor shapes."""
  reader = _reader(path)
  arch = _value(reader, 'general.architecture')
  if arch not in ARCHITECTURES:
    raise CheckpointError(f'{path}: GGUF architecture {arch!r} is not supported; lm imports '
                          f'{", ".join(ARCHITECTURES)}')
  names = {t.name: t for t in reader.tensors}
  scaling = _value(reader, f'{arch}.rope.scaling.type', 'none')
  factors = [n for n in ('rope_freqs.weight', 'rope_factors_long.weight') if n in names]
  if factors or scaling not in ('none', None, *ROPE_SCALING.get(arch, ())):
    raise CheckpointError(f'{path}: RoPE scaling ({factors[0] if factors else scaling}) is not '
                          f'supported for GGUF import of {arch}; lm imports '
                          + ('linear scaling or ' if arch in ROPE_SCALING else '')
                          + 'plain RoPE there')

  def need(key):
    value = _value(reader, f'{arch}.{key}')
    if value is None:
      raise CheckpointError(f'{path}: metadata {arch}.{key} is missing')
    return value

  D, H = int(need('embedding_length')), int(need('attention.head_count'))
  L = int(need('block_count'))
  kv = _value(reader, f'{arch}.attention.head_count_kv', H)
  if isinstance(kv, list):  # per-layer counts: only a uniform one fits lm's scanned layers
    if len(set(kv)) != 1:
      raise CheckpointError(f'{path}: per-layer head_count_kv {sorted(set(kv))} is not supported')
    kv = kv[0]
  K = int(_value(reader, f'{arch}.attention.key_length', D // H))
  rotary = _value(reader, f'{arch}.rope.dimension_count', K)
  if int(rotary) != K:
    raise CheckpointError(f'{path}: partial RoPE ({arch}.rope.dimension_count={rotary} of head size '
                          f'{K}) is not supported; lm rotates whole heads')
  if arch == 'phi3' and K != D // H:  # its graph builds q and o as [d_model, d_model]
    raise CheckpointError(f'{path}: a phi3 file with heads of {K} (not d_model / n_heads = '
                          f'{D // H}) is not one llama.cpp runs')
  embed = names.get('token_embd.weight')
  if embed is None:
    raise CheckpointError(f'{path}: tensor token_embd.weight is missing')
  moe, family = {}, FAMILY_OF[arch]
  if 'blk.0.ffn_gate_exps.weight' in names:
    family = 'mixtral' if arch == 'llama' else family
    # Both graphs renormalise the chosen experts' weights (llama.cpp's build_moe_ffn norm_w).
    moe = dict(moe=dict(n_experts=int(need('expert_count')),
                        experts_per_token=int(need('expert_used_count')),
                        expert_dim=int(_value(reader, f'{arch}.expert_feed_forward_length',
                                              need('feed_forward_length'))),
                        norm_topk_prob=True))
  vocab = int(_value(reader, f'{arch}.vocab_size', embed.shape[-1]))
  theta = float(_value(reader, f'{arch}.rope.freq_base', 10000.0))
  # No window outside Gemma, Phi-3's included: llama.cpp reads its attention.sliding_window but
  # runs without one (src/models/phi3.cpp disables it), so the file's model is the windowless one.
  fields = dict(
      vocab_size=vocab, d_model=D, n_layers=L, n_heads=H, n_kv_heads=int(kv),
      head_dim=0 if K == D // H else K, mlp_dim=int(need('feed_forward_length')),
      max_seq_len=int(_value(reader, f'{arch}.context_length', 2048)),
      rope_theta=theta, rope_scaling=None, rope_local_theta=0.0,
      qkv_bias='blk.0.attn_q.bias' in names, tie_embeddings='output.weight' not in names,
      norm_eps=float(need('attention.layer_norm_rms_epsilon')), norm_offset=0.0,
      embed_scale=False, mlp_activation='silu', norm_placement='pre', sliding_window=0,
      layer_types=(), query_pre_attn_scalar=0.0, attn_logit_softcap=0.0, final_logit_softcap=0.0,
      attn_out_bias='blk.0.attn_output.bias' in names,
      qk_norm='blk.0.attn_q_norm.weight' in names, hf_family=family, **moe)
  scaled = scaling not in ('none', None)
  if scaled:
    fields['rope_scaling'] = dict(type=scaling, factor=float(need('rope.scaling.factor')))
  if arch in GRAPH_FIELDS:
    fields.update(GRAPH_FIELDS[arch], **_gemma_fields(reader, arch, L, D, H, K, theta, scaled))
  if arch == 'smollm3':  # its graph skips RoPE on every 4th layer (n_no_rope_layer_step = 4)
    fields['rope_layers'] = _smollm3_rope_layers(L)
  if arch == 'olmo2':
    fields.update(norm_placement='post', qk_norm_scope='all', **_olmo_fields(reader, L))
  return fields


def _olmo_fields(reader, L: int) -> dict:
  """An olmo2 file's windows: none (OLMo 2), or sliding layers by the file's pattern (default
  three of each four; OLMo 3). Its graph rotates sliding layers at rope.freq_base, unscaled
  (src/models/olmo2.cpp reads rope.freq_base_swa but never uses it)."""
  window = int(_value(reader, 'olmo2.attention.sliding_window', 0))
  if window <= 0:
    return {}
  kinds = _swa_kinds(reader, 'olmo2', L)
  return dict(hf_family='olmo3', sliding_window=window if 'sliding' in kinds else 0,
              layer_types=kinds if len(set(kinds)) > 1 else ())


def _gemma_fields(reader, arch: str, L: int, D: int, H: int, K: int, theta: float,
                  scaled: bool) -> dict:
  """The windows, RoPE bases, softcaps and attention scale of a Gemma 2/3 file, with llama.cpp's
  defaults for what it leaves out (llama-hparams.h, src/models/gemma2.cpp, gemma3.cpp)."""
  gemma2 = arch == 'gemma2'
  window = int(_value(reader, f'{arch}.attention.sliding_window', 4096 if gemma2 else 0))
  kinds = _swa_kinds(reader, arch, L) if window > 0 else ('full',) * L
  # Sliding layers' base: Gemma 2's defaults to rope.freq_base, Gemma 3's to 10000.
  local = float(_value(reader, f'{arch}.rope.freq_base_swa', theta if gemma2 else 10000.0))
  softcaps = (50.0, 30.0) if gemma2 else (0.0, 0.0)
  return dict(
      sliding_window=window if 'sliding' in kinds else 0,
      layer_types=kinds if len(set(kinds)) > 1 else (),
      # lm's sliding layers share the full layers' base and scaling unless this is set.
      rope_local_theta=local if 'sliding' in kinds and (local != theta or scaled) else 0.0,
      query_pre_attn_scalar=float(D // H if L == WIDE_LAYERS[arch] else K),
      attn_logit_softcap=float(_value(reader, f'{arch}.attn_logit_softcapping', softcaps[0]))
      if gemma2 else 0.0,  # Gemma 3's graph has no attention softcap
      final_logit_softcap=float(_value(reader, f'{arch}.final_logit_softcapping', softcaps[1])))


def _swa_kinds(reader, arch: str, L: int) -> tuple[str, ...]:
  """Per layer 'sliding' / 'full' as llama.cpp's load_swa_pattern reads them: a per-layer bool
  array, a period n, or the architecture's default period."""
  pattern = _value(reader, f'{arch}.attention.sliding_window_pattern', SWA_PATTERN[arch])
  if isinstance(pattern, list):
    if len(pattern) != L:
      raise CheckpointError(f'{arch}.attention.sliding_window_pattern has {len(pattern)} entries '
                            f'for {L} layers')
    return tuple('sliding' if p else 'full' for p in pattern)
  return swa_pattern(int(pattern), L)


def swa_pattern(n: int, L: int) -> tuple[str, ...]:
  """llama.cpp's set_swa_pattern(n) over L layers (n = 0: all sliding)."""
  return tuple('sliding' if n == 0 or i % n < n - 1 else 'full' for i in range(L))


def permute_rows(w: np.ndarray, n_heads: int, *, inverse: bool) -> np.ndarray:
  """llama.cpp's q/k row permutation (rotate-half -> interleaved pairs), or its inverse.
  Rows are [heads * head_dim] (a weight's first axis, or a bias)."""
  half = w.shape[0] // n_heads // 2
  shape = (n_heads, half, 2) if inverse else (n_heads, 2, half)
  return w.reshape(*shape, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Tensors:
  """A GGUF file's tensors under Hugging Face names, dequantized to float32 on read; the
  interface of lm.io.safetensors.Reader that lm.io.hf's loaders use."""

  def __init__(self, path: str):
    import gguf  # pylint: disable=import-outside-toplevel
    self._gguf = gguf
    self.path = path
    reader = _reader(path)
    self.arch = _value(reader, 'general.architecture')
    self.n_heads = int(_value(reader, f'{self.arch}.attention.head_count'))
    kv = _value(reader, f'{self.arch}.attention.head_count_kv', self.n_heads)
    self.n_kv_heads = int(kv[0] if isinstance(kv, list) else kv)
    # GGUF norm weights are what llama.cpp multiplies by: offset + lm's scale.
    self.norm_offset = GRAPH_FIELDS.get(self.arch, {}).get('norm_offset', 0.0)
    family = FAMILY_OF.get(self.arch)
    if self.arch == 'llama' and any(t.name == 'blk.0.ffn_gate_exps.weight' for t in reader.tensors):
      family = 'mixtral'
    to_hf = {}
    n_layers = int(_value(reader, f'{self.arch}.block_count', 0))
    for gguf_name, hf_name in names_of(family).items():
      for i in range(n_layers) if '{i}' in gguf_name else [None]:
        to_hf[gguf_name.format(i=i)] = hf_name.format(i=i)
    self._tensors, self._experts, self._cached = {}, {}, (None, None)
    for gguf_name, hf_name in EXPERT_NAMES.get(family, {}).items():
      if '{e}' not in hf_name:  # the router
        to_hf.update({gguf_name.format(i=i): hf_name.format(i=i) for i in range(n_layers)})
    for t in reader.tensors:
      if t.tensor_type.name not in TENSOR_TYPES:
        raise CheckpointError(f'{path}: tensor {t.name} has GGUF type {t.tensor_type.name}, which lm '
                              f'does not read; supported: {", ".join(TENSOR_TYPES)}')
      expert = self._expert_template(family, t.name)
      if expert is not None:  # [n_expert, out, in]: one HF tensor per expert
        for e in range(int(t.shape[-1])):
          self._experts[expert.format(e=e)] = (t, e)
        continue
      self._tensors[to_hf.get(t.name, t.name)] = t

  @staticmethod
  def _expert_template(family, name):
    for gguf_name, hf_name in EXPERT_NAMES.get(family, {}).items():
      found = re.fullmatch(re.escape(gguf_name).replace(r'\{i\}', r'(\d+)'), name)
      if found and '{e}' in hf_name:
        return hf_name.replace('{i}', found.group(1))
      if found:  # the router: an ordinary tensor under its HF name
        return None
    return None

  def names(self):
    return list(self._tensors) + list(self._experts)

  def __contains__(self, name):
    return name in self._tensors or name in self._experts

  def shape(self, name) -> tuple:
    if name in self._experts:
      return tuple(int(n) for n in reversed(self._experts[name][0].shape))[1:]
    return tuple(int(n) for n in reversed(self._tensors[name].shape))

  def get(self, name) -> np.ndarray:
    if name in self._experts:  # the layer's experts are dequantized once, then sliced
      t, e = self._experts[name]
      if self._cached[0] is not t:
        whole = self._gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        self._cached = (t, whole.reshape(tuple(int(n) for n in reversed(t.shape))))
      return self._cached[1][e]
    t = self._tensors[name]
    array = self._gguf.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
    array = array.reshape(self.shape(name))
    if self.norm_offset and name.endswith('norm.weight'):
      array = array - np.float32(self.norm_offset)
    if self.arch in PERMUTED:
      if '.q_proj.' in name:
        array = permute_rows(array, self.n_heads, inverse=True)
      elif '.k_proj.' in name:
        array = permute_rows(array, self.n_kv_heads, inverse=True)
    return array

  def read(self, name: str, shape: tuple, layout: int, index: tuple) -> np.ndarray:
    """`index` of the tensor in lm's layout (lm/io/safetensors.py Reader.read). Quantized blocks
    are dequantized whole: the tensor is read once per device slice."""
    return hf.to_lm(self.get(name), shape, layout)[index]


def load_params(path: str, spec, shardings: dict) -> dict:
  """The weights of GGUF file `path` as {lm name: array} placed with `shardings`."""
  reader = Tensors(path)
  table = hf.param_map(spec.shapes, spec.cfg.get('hf_family') or 'llama', spec.cfg)
  shapes = {n: s.shape for n, s in spec.shapes.items()}
  L, E = spec.cfg.n_layers, n_experts(spec.cfg)
  expected, plan = {}, {}
  for name, (template, layout, _) in table.items():
    shape = spec.shapes[name].shape
    stacked = hf.stacked_dims(name, template)
    names = ([template.format(i=i, e=e) for i in range(L) for e in range(E)] if stacked == 2 else
             [template.format(i=i) for i in range(L)] if stacked else [template])
    rows, total = hf.fused_rows(shapes, table, name)
    one = hf.hf_shape(shape[stacked:], layout)
    expected.update({n: ((total, *one[1:]), name) for n in names})
    plan[name] = (names, stacked, layout, rows)
  hf.check_tensors(reader, expected, path, spec.cfg.tie_embeddings)
  return {name: hf.place(spec.shapes[name].shape, shardings[name],
                         hf.read_stacked(reader, names, spec.shapes[name].shape, layout,
                                         spec.shapes[name].dtype, stacked, rows))
          for name, (names, stacked, layout, rows) in plan.items()}


# ----------------------------------------------------------------------------- export


def _kinds(m) -> tuple[str, ...]:
  """Per layer 'sliding' / 'full' as lm runs model config `m`."""
  return tuple(m.layer_types) or (('sliding' if m.sliding_window else 'full'),) * m.n_layers


def _query_scalar(m, arch: str) -> int:
  """The query_pre_attn_scalar llama.cpp's Gemma graph `arch` uses for `m`'s shape."""
  return m.d_model // m.n_heads if m.n_layers == WIDE_LAYERS[arch] else head_dim(m)


def _rope_fits(m, arch: str) -> bool:
  if not m.rope_scaling:
    return True
  if m.rope_scaling.get('type') not in ROPE_SCALING.get(arch, ()):
    return False
  # Gemma 3 leaves sliding layers unscaled; lm scales them too unless rope_local_theta is set.
  return bool(m.rope_local_theta) or 'sliding' not in _kinds(m)


PLAIN = ('llama', 'qwen2', 'qwen3', 'mixtral', 'qwen3_moe')
GEMMA = ('gemma2', 'gemma3_text')
OLMO = ('olmo2', 'olmo3')
V3_MOE = ('deepseek_v3', 'glm4_moe')
QWEN_EXPERTS = ('qwen3_5_moe_text', 'qwen3_next')
HYBRID = ('qwen3_5_text',) + QWEN_EXPERTS
NEWER = ('smollm3',) + OLMO + ('gpt_oss',) + V3_MOE + ('llama4_text',) + HYBRID
EVERY = PLAIN + GEMMA + ('phi3',) + NEWER + ('gemma4_text',)
# What llama.cpp's graph for a family computes (or what lm writes for it) that a model of that
# family may differ in, beyond what lm.io.hf.family_of already holds to: (families, lm model
# field, fits(model config), the rule). Export refuses the first model field that does not fit.
EXPORT_LIMITS = (
    (PLAIN + ('gemma2', 'phi3') + NEWER, 'rope_scaling', lambda m, arch: not m.rope_scaling,
     "lm writes llama.cpp's {arch} files with plain RoPE (llama.cpp's convert_hf_to_gguf.py "
     'converts RoPE scaling)'),
    (('gemma3_text',), 'rope_scaling', _rope_fits,
     "llama.cpp's gemma3 graph scales RoPE linearly and on full layers only (sliding layers "
     'unscaled, at model.rope_local_theta)'),
    (EVERY, 'mlp_bias', lambda m, arch: not m.mlp_bias, 'lm writes no MLP biases to GGUF'),
    (GEMMA + ('phi3',), 'qkv_bias', lambda m, arch: not m.qkv_bias,
     "llama.cpp's {arch} graph has no attention biases"),
    (GEMMA + ('phi3', 'smollm3', 'llama4_text') + OLMO, 'attn_out_bias', lambda m, arch: not m.attn_out_bias,
     "llama.cpp's {arch} graph has no attention output bias"),
    (('gpt_oss',), 'attn_out_bias', lambda m, arch: m.attn_out_bias,
     "llama.cpp's gpt-oss graph has attention biases (it requires attn_output.bias)"),
    (PLAIN + ('smollm3', 'olmo2'), 'sliding_window', lambda m, arch: not m.sliding_window,
     "llama.cpp's {arch} graph has no sliding window"),
    (('smollm3',), 'rope_layers',
     lambda m, arch: tuple(m.rope_layers) == _smollm3_rope_layers(m.n_layers),
     "llama.cpp's smollm3 graph skips RoPE on every 4th layer (layers 3, 7, ...) and rotates the "
     'others'),
    (('gpt_oss',), 'moe.swiglu_limit', lambda m, arch: m.moe.swiglu_limit == GPT_OSS_SWIGLU[0],
     "llama.cpp's gpt-oss graph clamps the experts' SwiGLU at {swiglu[0]}"),
    (('gpt_oss',), 'moe.swiglu_alpha', lambda m, arch: m.moe.swiglu_alpha == GPT_OSS_SWIGLU[1],
     "llama.cpp's gpt-oss graph gates the experts' SwiGLU with sigmoid({swiglu[1]} x)"),
    (('gpt_oss',), 'layer_types', lambda m, arch: 'sliding' in _kinds(m) and m.sliding_window > 0,
     "llama.cpp's gpt-oss graph has sliding-window layers (it reads attention.sliding_window)"),
    (('deepseek_v3',), 'qkv_bias', lambda m, arch: not m.qkv_bias,
     "llama.cpp's deepseek2 graph has no attention biases"),
    (('deepseek_v3',), 'rope_interleaved', lambda m, arch: m.rope_interleaved,
     "llama.cpp's deepseek2 graph rotates interleaved pairs (DeepSeek's own rope_interleave)"),
    (('llama4_text',), 'moe.n_experts', lambda m, arch: n_experts(m) > 0,
     "llama.cpp's llama4 graph needs experts (it refuses a model without)"),
    (('llama4_text',), 'mlp_types', lambda m, arch: _moe_step(m) is not None,
     "llama.cpp's llama4 graph has experts in every n-th layer (interleave_moe_layer_step), the "
     'others dense'),
    (('llama4_text',), 'layer_types', lambda m, arch: 'chunked' in _kinds(m),
     "llama.cpp's llama4 graph has chunked-attention layers (lm writes them as its per-layer pattern)"),
    (('llama4_text',), 'attention_chunk_size',
     lambda m, arch: m.attention_chunk_size == LLAMA4_FIXED['chunk'],
     "llama.cpp's llama4 graph attends within chunks of {llama4[chunk]} positions (fixed in code)"),
    (('llama4_text',), 'rope_layers', lambda m, arch: tuple(m.rope_layers) == _smollm3_rope_layers(m.n_layers),
     "llama.cpp's llama4 graph skips RoPE on every 4th layer (layers 3, 7, ...) and rotates the others"),
    (('llama4_text',), 'attn_temperature_floor_scale',
     lambda m, arch: (m.attn_temperature_floor_scale, m.attn_temperature_scale)
     == (LLAMA4_FIXED['floor'], LLAMA4_FIXED['scale']),
     "llama.cpp's llama4 graph tunes NoPE layers' query temperature with floor {llama4[floor]} and "
     'scale {llama4[scale]} (fixed in code; model.attn_temperature_scale too)'),
    (('llama4_text',), 'qk_l2_norm', lambda m, arch: bool(m.qk_l2_norm) == (n_experts(m) != 128),
     "llama.cpp's llama4 graph L2-normalises RoPE layers' q and k unless the model has 128 experts"),
    (('olmo3',), 'rope_local_theta',
     lambda m, arch: m.rope_local_theta in (0.0, m.rope_theta) or 'sliding' not in _kinds(m),
     "llama.cpp's olmo2 graph rotates sliding layers at the full layers' base (rope.freq_base; it "
     'reads rope.freq_base_swa and leaves it unused), so it must equal model.rope_theta'),
    (OLMO, 'head_dim', lambda m, arch: head_dim(m) == m.d_model // m.n_heads,
     "llama.cpp's olmo2 graph has heads of d_model / n_heads"),
    (PLAIN, 'moe.norm_topk_prob', lambda m, arch: not n_experts(m) or m.moe.norm_topk_prob,
     "llama.cpp's {arch} graph renormalises the chosen experts' weights"),
    (PLAIN, 'mlp_types', lambda m, arch: 'dense' not in tuple(m.get('mlp_types') or ()),
     "llama.cpp's {arch} graph has experts in every layer"),
    (('gemma2',), 'tie_embeddings', lambda m, arch: m.tie_embeddings,
     "llama.cpp's gemma2 graph projects the output with the embeddings (it has no output.weight)"),
    (('gemma2',), 'attn_logit_softcap', lambda m, arch: m.attn_logit_softcap > 0,
     "llama.cpp's gemma2 graph always soft-caps attention logits"),
    (('gemma2',), 'final_logit_softcap', lambda m, arch: m.final_logit_softcap > 0,
     "llama.cpp's gemma2 graph always soft-caps the output logits"),
    (('gemma2',), 'layer_types', lambda m, arch: _kinds(m) == swa_pattern(2, m.n_layers),
     "llama.cpp's gemma2 graph alternates sliding and full layers, sliding first"),
    (('gemma3_text',), 'layer_types',
     lambda m, arch: 'sliding' not in _kinds(m) or _kinds(m) == swa_pattern(6, m.n_layers),
     "llama.cpp's gemma3 graph has every sixth layer full and the others sliding, or all full"),
    (GEMMA, 'query_pre_attn_scalar',
     lambda m, arch: (m.query_pre_attn_scalar or head_dim(m)) == _query_scalar(m, arch),
     "llama.cpp's {arch} graph scales queries by head_dim ** -0.5 (by (d_model // n_heads) ** -0.5 "
     'at {wide} layers) whatever the file says, here {scalar} ** -0.5'),
    (HYBRID + ('gemma4_text',), 'qkv_bias', lambda m, arch: not m.qkv_bias,
     "llama.cpp's {arch} graph has no attention biases"),
    (HYBRID, 'layer_types', lambda m, arch: {'linear', 'full'} <= set(_kinds(m)),
     "llama.cpp's {arch} graph needs DeltaNet and full-attention layers both (it aborts on a file "
     'without either)'),
    (HYBRID, 'linear_attn.value_head_dim',
     lambda m, arch: m.linear_attn.value_head_dim == m.linear_attn.key_head_dim,
     "llama.cpp's {arch} graph gives DeltaNet keys and values one head size (ssm.state_size), "
     'model.linear_attn.key_head_dim'),
    (QWEN_EXPERTS, 'moe.norm_topk_prob', lambda m, arch: m.moe.norm_topk_prob,
     "llama.cpp's {arch} graph renormalises the chosen experts' weights"),
    (QWEN_EXPERTS, 'moe.shared_dim', lambda m, arch: m.moe.shared_dim > 0,
     "llama.cpp's {arch} graph requires the gated shared expert"),
    (('qwen3_next',), 'mlp_types', lambda m, arch: 'dense' not in tuple(m.mlp_types),
     "llama.cpp's qwen3next graph requires experts in every layer"),
    (('gemma4_text',), 'layer_types', lambda m, arch: 'sliding' in _kinds(m),
     "llama.cpp's gemma4 graph needs sliding-window layers (it aborts on a file without)"),
    (('gemma4_text',), 'rope_scaling',
     lambda m, arch: not m.rope_scaling or m.rope_scaling.get('type') in ('proportional', 'linear'),
     "llama.cpp's gemma4 graph scales full layers' RoPE per frequency (rope_freqs), which holds "
     'proportional or linear scaling'),
    (('gemma4_text',), 'rope_local_theta',
     lambda m, arch: bool(m.rope_local_theta) or not m.rope_scaling or 'sliding' not in _kinds(m),
     "llama.cpp's gemma4 graph rotates sliding layers unscaled (at rope.freq_base_swa), so a scaled "
     'model needs model.rope_local_theta'),
    (('gemma4_text',), 'per_layer_input_vocab',
     lambda m, arch: m.per_layer_input_vocab in (0, m.vocab_size),
     "llama.cpp's gemma4 graph has a per-layer input embedding for every token of the vocabulary"),
    (('gemma4_text',), 'kv_shared_layers', lambda m, arch: _kv_sources_fit(m),
     "llama.cpp's gemma4 graph has KV-shared layers reuse the last layer before them (full "
     'layers) or the one before that (sliding layers), so those must be a sliding then a full one'),
    (('phi3',), 'head_dim', lambda m, arch: head_dim(m) == m.d_model // m.n_heads,
     "llama.cpp's phi3 graph has heads of d_model / n_heads"),
    (('phi3',), 'sliding_window',
     lambda m, arch: not m.sliding_window or m.sliding_window >= m.max_seq_len,
     "llama.cpp's phi3 graph reads attention.sliding_window and ignores it (it attends to the "
     'whole context), so only a window of at least model.max_seq_len fits'),
)


def _moe_step(m) -> int | None:
  """n when exactly the layers i with (i + 1) % n == 0 have experts (llama4's layout), else None."""
  types = tuple(m.mlp_types) or ('moe' if n_experts(m) else 'dense',) * m.n_layers
  if 'moe' not in types:
    return None
  n = types.index('moe') + 1
  return n if types == tuple('moe' if (i + 1) % n == 0 else 'dense' for i in range(m.n_layers)) else None


def _kv_sources_fit(m) -> bool:
  """Whether each KV-shared layer reads the keys and values lm's does (the last earlier layer of
  its kind) where llama.cpp's gemma4 graph takes them: layer F - 1 for full layers, F - 2 for
  sliding ones, F the first shared layer (src/llama-model.cpp, the KV cache's reuse)."""
  kinds, F = _kinds(m), m.n_layers - m.kv_shared_layers
  if not m.kv_shared_layers:
    return True
  if F < 2:
    return False
  for kind in set(kinds[F:]):
    source = max((j for j in range(F) if kinds[j] == kind), default=None)
    if source != (F - 2 if kind == 'sliding' else F - 1):
      return False
  return True


def _smollm3_rope_layers(L: int) -> tuple[int, ...]:
  return tuple(int((i + 1) % SMOLLM3_NOPE_STEP != 0) for i in range(L))


def _shown(m, field: str):
  if field == 'layer_types':
    return _kinds(m)
  value = m
  for part in field.split('.'):
    value = value.get(part)
  return value


def check_exportable(m, family: str) -> str:
  """The llama.cpp architecture model config `m` (of lm family `family`) exports as, or a
  one-line CheckpointError naming what llama.cpp would compute differently."""
  arch = ARCH_OF.get(family)
  if arch is None:
    raise CheckpointError(f'GGUF export writes {", ".join(ARCH_OF)} models (others: --format hf, '
                          'then llama.cpp\'s convert_hf_to_gguf.py); this model is '
                          f'{family}')
  for families, field, fits, rule in EXPORT_LIMITS:
    if family in families and not fits(m, arch):
      scalar = _query_scalar(m, arch) if arch in WIDE_LAYERS else None
      rule = rule.format(arch=arch, wide=WIDE_LAYERS.get(arch), scalar=scalar, swiglu=GPT_OSS_SWIGLU,
                         llama4=LLAMA4_FIXED)
      raise CheckpointError(f'GGUF export: {rule}, but this model has model.{field}='
                            f'{_shown(m, field)!r}; export it with --format hf')
  return arch


def save(path: str, params: dict, model_cfg, tokenizer, *, dtype: str = 'f16',
         name: str = 'lm export') -> str:
  """Writes base weights `params` (flat lm names, LoRA already merged) and `tokenizer` as one GGUF
  file at `path`, atomically. Returns the GGUF architecture written."""
  import gguf  # pylint: disable=import-outside-toplevel
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f'--dtype {dtype} is not a GGUF export type; choose {" or ".join(EXPORT_DTYPES)}')
  m = model_cfg
  family = hf.family_of(m)
  arch = check_exportable(m, family)
  tensors = _tensor_plan(params, m, family)  # refuses a tensor llama.cpp has no name for
  E = n_experts(m)
  K = head_dim(m)
  token_fields = gguf_tokenizer.fields_for(tokenizer)
  qtype = {'f16': gguf.GGMLQuantizationType.F16, 'q8_0': gguf.GGMLQuantizationType.Q8_0}[dtype]
  file_type = {'f16': gguf.LlamaFileType.MOSTLY_F16, 'q8_0': gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
  writer = gguf.GGUFWriter(tmp, arch)
  try:
    writer.add_name(name)
    writer.add_context_length(m.max_seq_len)
    writer.add_embedding_length(m.d_model)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(_feed_forward_length(m, family))
    if E:
      writer.add_expert_count(E)
      writer.add_expert_used_count(m.moe.experts_per_token)
      if family in ('qwen3_moe', 'gpt_oss', 'gemma4_text') + QWEN_EXPERTS:
        writer.add_expert_feed_forward_length(m.moe.expert_dim or m.mlp_dim)
    if family in V3_MOE:
      _add_v3_moe_metadata(writer, m)
    writer.add_head_count(m.n_heads)
    writer.add_rope_freq_base(float(m.rope_theta))
    writer.add_layer_norm_rms_eps(float(m.norm_eps))
    if family == 'deepseek_v3':
      _add_mla_metadata(writer, m)
    elif family == 'gemma4_text':
      _add_gemma4_metadata(writer, m)
    else:
      writer.add_head_count_kv(m.n_kv_heads)
      writer.add_rope_dimension_count(round(K * m.partial_rotary_factor))
      if K != m.d_model // m.n_heads or family in GEMMA:  # llama.cpp's converter always writes Gemma's
        writer.add_key_length(K)
        writer.add_value_length(K)
    _add_family_metadata(writer, m, family)
    writer.add_vocab_size(m.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, token_fields)
    for gguf_name, array in _tensors(params, m, tensors, permuted=arch in PERMUTED):
      matrix = (array.ndim >= 2 and gguf_name.endswith('.weight')  # experts' biases are 2-D
                and not any(part in gguf_name for part in F32_TENSORS))
      if qtype == gguf.GGMLQuantizationType.Q8_0 and matrix and array.shape[-1] % 32 == 0:
        writer.add_tensor(gguf_name, gguf.quantize(array, qtype), raw_dtype=qtype)
      elif matrix:
        writer.add_tensor(gguf_name, array.astype(np.float16))
      else:  # norms and biases stay float32, as llama.cpp writes them (its adds need them so)
        writer.add_tensor(gguf_name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return arch


def _feed_forward_length(m, family: str):
  """feed_forward_length: Gemma 4's per layer where its KV-shared layers' MLPs are wider."""
  if family in ('mixtral', 'gpt_oss'):
    return m.moe.expert_dim or m.mlp_dim
  if 'wide' in tuple(m.get('mlp_types') or ()):
    return [m.wide_mlp_dim if t == 'wide' else m.mlp_dim for t in m.mlp_types]
  return m.mlp_dim


def _add_hybrid_metadata(writer, m, arch: str) -> None:
  """Qwen3.5 / Qwen3-Next's keys (conversion/qwen.py): the DeltaNet's sizes as llama.cpp's ssm.*
  keys, which layers are DeltaNet ones, the shared expert's width; qwen35's M-RoPE sections."""
  la = m.linear_attn
  writer.add_ssm_conv_kernel(la.conv_kernel)
  writer.add_ssm_state_size(la.key_head_dim)
  writer.add_ssm_group_count(la.n_key_heads)
  writer.add_ssm_time_step_rank(la.n_value_heads)
  writer.add_ssm_inner_size(la.value_head_dim * la.n_value_heads)
  writer.add_array(f'{arch}.attention.recurrent_layers', [kind == 'linear' for kind in _kinds(m)])
  if n_experts(m):
    writer.add_expert_shared_feed_forward_length(m.moe.shared_dim)
  if arch in ('qwen35', 'qwen35moe'):
    writer.add_rope_dimension_sections(_mrope_sections(m))


def _mrope_sections(m) -> list[int]:
  """qwen35's M-RoPE sections for its rotated pairs, all text positions: llama.cpp gives text
  tokens the same position in the first three sections (the fourth 0) and interleaves them, pair
  p in section p % 3 up to 3 * that section's size; these sizes cover every pair (11, 11, 10 for
  Qwen3.5's 32 pairs, the converter's default), so each rotates by the token's position."""
  pairs = rotary_dim(m) // 2
  return [len(range(r, pairs, 3)) for r in range(3)] + [0]


def _add_gemma4_metadata(writer, m) -> None:
  """Gemma 4's attention keys (conversion/gemma.py): full and sliding layers' head sizes, KV
  heads per layer, which layers slide and with which window, RoPE over whole heads (full layers'
  proportional share through rope_freqs), KV sharing, the per-layer inputs' width."""
  kinds = _kinds(m)
  K, K_full = head_dim(m), m.global_head_dim or head_dim(m)
  writer.add_head_count_kv([(m.global_kv_heads or m.n_kv_heads) if kind == 'full' else m.n_kv_heads
                            for kind in kinds])
  writer.add_key_length(K_full)
  writer.add_value_length(K_full)
  writer.add_key_length_swa(K)
  writer.add_value_length_swa(K)
  writer.add_rope_dimension_count(K_full)
  writer.add_rope_dimension_count_swa(K)
  writer.add_rope_freq_base_swa(float(m.rope_local_theta or m.rope_theta))
  writer.add_sliding_window_pattern([kind == 'sliding' for kind in kinds])
  writer.add_sliding_window(int(m.sliding_window or m.max_seq_len))
  writer.add_shared_kv_layers(m.kv_shared_layers)
  writer.add_embedding_length_per_layer_input(m.per_layer_input_dim)
  if m.final_logit_softcap:
    writer.add_final_logit_softcapping(float(m.final_logit_softcap))


def _rope_freqs(m) -> np.ndarray:
  """Gemma 4's full layers' frequency divisors [K_full / 2] (llama.cpp divides each rotated
  pair's angle by its entry): the scaling factor on the proportional share of the frequencies,
  1e30 on the others (angle 0: they pass through, as lm's zero frequencies), as its converter."""
  K = m.global_head_dim or head_dim(m)
  scaling = m.rope_scaling or {}
  factor = float(scaling.get('factor', 1.0))
  share = K // 2
  if scaling.get('type') == 'proportional':  # as lm/model/rope.py counts its rotated pairs
    share = int(scaling['partial_rotary_factor'] * K // 2)
  return np.asarray([factor] * share + [1e30] * (K // 2 - share), np.float32)


def _add_v3_moe_metadata(writer, m) -> None:
  """DeepSeek-V3 / GLM-4.5's MoE keys, as llama.cpp's converter writes them (conversion/deepseek.py,
  glm.py): dense layers first, shared experts, the sigmoid router's scaling, renormalisation and
  expert groups."""
  import gguf  # pylint: disable=import-outside-toplevel
  moe, types = m.moe, tuple(m.mlp_types) or ('moe',) * m.n_layers
  F = moe.expert_dim or m.mlp_dim
  writer.add_leading_dense_block_count(types.index('moe') if 'moe' in types else m.n_layers)
  writer.add_expert_feed_forward_length(F)
  writer.add_expert_shared_count(moe.shared_dim // F if n_experts(m) else 0)
  if not n_experts(m):
    return
  writer.add_expert_weights_scale(float(moe.routed_scaling_factor))
  writer.add_expert_weights_norm(bool(moe.norm_topk_prob))
  writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
  if moe.n_group > 1 and moe.topk_group < moe.n_group:  # all groups chosen: no limit to write
    writer.add_expert_group_count(moe.n_group)
    writer.add_expert_group_used_count(moe.topk_group)


def _add_mla_metadata(writer, m) -> None:
  """DeepSeek's MLA as llama.cpp runs it absorbed (conversion/deepseek.py): one key/value head of
  the latent (plus the rotated part for keys), and the per-head sizes after kv_b."""
  a = m.mla
  writer.add_head_count_kv(1)
  writer.add_q_lora_rank(a.q_lora_rank)  # 0: q is one projection (attn_q)
  writer.add_kv_lora_rank(a.kv_lora_rank)
  writer.add_key_length(a.kv_lora_rank + a.qk_rope_head_dim)
  writer.add_value_length(a.kv_lora_rank)
  writer.add_key_length_mla(a.qk_nope_head_dim + a.qk_rope_head_dim)
  writer.add_value_length_mla(a.v_head_dim)
  writer.add_rope_dimension_count(a.qk_rope_head_dim)


def _add_family_metadata(writer, m, family: str) -> None:
  """The keys llama.cpp's converter writes for Gemma 2/3, OLMo 3 and Phi-3 (conversion/gemma.py,
  olmo.py, phi.py) that this model's values need."""
  import gguf  # pylint: disable=import-outside-toplevel
  sliding = 'sliding' in _kinds(m)
  if family == 'gemma2':  # the softcaps and the window are always on in its graph
    writer.add_attn_logit_softcapping(float(m.attn_logit_softcap))
    writer.add_final_logit_softcapping(float(m.final_logit_softcap))
    writer.add_sliding_window(int(m.sliding_window))
  elif family == 'gemma3_text':
    if m.final_logit_softcap:
      writer.add_final_logit_softcapping(float(m.final_logit_softcap))
    if sliding:  # no window: llama.cpp runs every layer full
      writer.add_sliding_window(int(m.sliding_window))
      # Unwritten, llama.cpp's Gemma 3 sliding layers would use base 10000.
      writer.add_rope_freq_base_swa(float(m.rope_local_theta or m.rope_theta))
    if m.rope_scaling:  # linear (EXPORT_LIMITS): full layers' positions / factor
      writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
      writer.add_rope_scaling_factor(float(m.rope_scaling['factor']))
  elif family == 'gpt_oss':  # every file has a window; which layers slide, as a per-layer array
    writer.add_sliding_window(int(m.sliding_window))
    writer.add_sliding_window_pattern([kind == 'sliding' for kind in _kinds(m)])
  elif family == 'llama4_text':  # chunked layers by a per-layer array (chunk and more: fixed)
    writer.add_interleave_moe_layer_step(_moe_step(m))
    writer.add_expert_feed_forward_length(m.moe.expert_dim or m.mlp_dim)
    writer.add_sliding_window_pattern([kind == 'chunked' for kind in _kinds(m)])
  elif family == 'olmo3' and sliding:  # olmo2's graph with windows: per-layer pattern, own base
    writer.add_sliding_window(int(m.sliding_window))
    writer.add_sliding_window_pattern([kind == 'sliding' for kind in _kinds(m)])
  elif family in HYBRID:
    _add_hybrid_metadata(writer, m, ARCH_OF[family])
  elif family == 'phi3':
    writer.add_rope_scaling_orig_ctx_len(m.max_seq_len)
    # Written as the converter does (0: none, as for Phi-4); llama.cpp's graph ignores it.
    writer.add_sliding_window(int(m.sliding_window))


def _tensor_plan(params: dict, m, family: str) -> list:
  """[(GGUF name template, [(lm names, convert)] concatenated row-wise)] for every base weight, in
  lm's parameter order; `convert` takes one layer's arrays of those lm parameters to GGUF's numpy
  order. Refuses a weight llama.cpp's architecture has no name for."""
  to_gguf = {hf_name: gguf_name for gguf_name, hf_name in
             {**names_of(family), **EXPERT_NAMES.get(family, {})}.items()}
  reshaped = HF_RESHAPED.get(family, {})
  by_lm = BY_LM_NAME.get(family, {})
  table = hf.param_map(params, family, m)
  plan = []

  def via_hf(template, names, to_hf):  # one HF tensor holding lm parameters `names`
    if template not in reshaped and template not in to_gguf:
      _named(names[0], {}, family, template)
    targets = reshaped.get(template) or ((to_gguf[template], _same),)
    plan.extend((gguf_name, [(names, lambda arrays, m, f=f: f(to_hf(*arrays), m))])
                for gguf_name, f in targets)

  for key, entry in table.items():
    names = key if isinstance(key, tuple) else (key,)  # a Custom entry holds several
    if key in by_lm or (isinstance(entry, Custom) and names[0] in by_lm):
      plan.extend((gguf_name, [((n,), _one(convert))]) for n in names if _named(n, by_lm, family)
                  for gguf_name, convert in by_lm[n])
      continue
    if isinstance(entry, Custom):
      via_hf(entry.template, names, entry.to_hf)
      continue
    template, layout, part = entry
    if template in reshaped:
      via_hf(template, names, lambda array, layout=layout: hf.to_hf(array, layout))
      continue
    if template not in to_gguf:
      _named(key, {}, family, template)
    if part is not None and part[0] > 0:
      continue  # written with the fused tensor's first part
    group = part[1] if part else (key,)  # Phi-3's q, k, v (or gate, up) in row order
    plan.append((to_gguf[template], [((n,), _one(_convert(table[n][1], '{e}' in template)))
                                     for n in group]))
  if m.tie_embeddings and ARCH_OF[family] in UNTIED:  # the same matrix, written twice
    plan.append(('output.weight', [(('embed',), _one(_same))]))
  if family == 'gemma4_text':  # not a parameter: the full layers' RoPE frequency divisors
    plan.append(('rope_freqs.weight', [((), lambda arrays, m: _rope_freqs(m))]))
  return plan


def _one(convert):
  """A convert of one lm array as a convert of a group's arrays."""
  return lambda arrays, m: convert(arrays[0], m)


def _named(lm_name: str, by_lm: dict, family: str, template: str | None = None) -> bool:
  if lm_name in by_lm:
    return True
  raise CheckpointError(f'GGUF export: lm has no llama.cpp {ARCH_OF[family]} tensor name for '
                        f'{template or lm_name} (lm parameter {lm_name}); export it with --format hf')


def _same(array, m):
  del m
  return array


def _experts_t(array):
  """[E, in, out] -> [E, out, in]: all of a layer's experts as llama.cpp stacks them."""
  return np.swapaxes(array, -1, -2)


def _kv_b(array, m):
  """One layer's MLA kv_b kernel [C, H, N + V] -> (k_b [H, C, N], v_b [H, V, C])."""
  N = m.mla.qk_nope_head_dim
  return array[:, :, :N].transpose(1, 0, 2), array[:, :, N:].transpose(1, 2, 0)


def _convert(layout: int, experts: bool):
  """One layer's lm array -> GGUF's numpy order, by its HF layout (lm.io.hf.to_hf)."""
  if experts:  # [E, in, out] -> [E, out, in]: all of the layer's experts, one tensor
    return lambda array, m: np.stack([hf.to_hf(expert, layout) for expert in array])
  return lambda array, m: hf.to_hf(array, layout)


def _tensors(params: dict, m, plan: list, *, permuted: bool):
  """(GGUF name, float32 numpy array in GGUF's [out, in] order, experts [n_expert, out, in])
  for every base weight of `plan` (_tensor_plan); `permuted`: q/k rows in llama.cpp's llama
  order (its llama graph rotates interleaved pairs)."""
  for gguf_template, group in plan:
    arrays = [[_host(params, name, m) for name in names] for names, _ in group]
    # Row j of a layer stack is model layer rows[j] (a stack holds only the layers of its kind).
    rows = stack_lib.layer_rows(m, group[0][0][0]) if group[0][0] else None
    for j, i in enumerate(rows) if rows is not None else [(None, None)]:
      parts = [convert([a if j is None else a[j] for a in layer], m)
               for layer, (_, convert) in zip(arrays, group)]
      value = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
      gguf_name = gguf_template.format(i=i)
      if permuted and '.attn_q.' in gguf_name:
        value = permute_rows(value, m.n_heads, inverse=False)
      elif permuted and '.attn_k.' in gguf_name:
        value = permute_rows(value, m.n_kv_heads, inverse=False)
      yield gguf_name, np.ascontiguousarray(value)


def _host(params: dict, name: str, m) -> np.ndarray:
  """lm parameter `name` as float32 on this host; a norm's weight as llama.cpp multiplies by it
  (lm's offset added, e.g. 1 + w for Gemma 2/3 and Qwen3.5; the DeltaNet's gated norm has none)."""
  array = np.asarray(hf.host(params[name]), np.float32)
  if name.endswith('norm.scale') and not name.startswith('layers.linear_attn.'):
    array = array + np.float32(m.norm_offset)
  return array


def _add_tokenizer(writer, fields: dict) -> None:
  simple = {'tokenizer.ggml.model': writer.add_tokenizer_model,
            'tokenizer.ggml.pre': writer.add_tokenizer_pre,
            'tokenizer.ggml.tokens': writer.add_token_list,
            'tokenizer.ggml.merges': writer.add_token_merges,
            'tokenizer.ggml.token_type': writer.add_token_types,
            'tokenizer.ggml.scores': writer.add_token_scores,
            'tokenizer.ggml.bos_token_id': writer.add_bos_token_id,
            'tokenizer.ggml.eos_token_id': writer.add_eos_token_id,
            'tokenizer.ggml.unknown_token_id': writer.add_unk_token_id,
            'tokenizer.ggml.padding_token_id': writer.add_pad_token_id,
            'tokenizer.ggml.add_bos_token': writer.add_add_bos_token,
            'tokenizer.ggml.add_eos_token': writer.add_add_eos_token,
            'tokenizer.ggml.add_space_prefix': writer.add_add_space_prefix,
            'tokenizer.chat_template': writer.add_chat_template}
  for key, value in fields.items():
    if key in simple and value is not None:
      simple[key](value)
