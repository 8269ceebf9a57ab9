"""lm's GGUF exports in llama.cpp itself, through llama-cpp-python (an optional test dependency:
it builds from source, reported at about 35 minutes on 2 cores; docs/finetuning.md says how). Skipped where it
is not installed, which includes this project's CI.

For each family lm exports (llama, qwen2, qwen3, Mixtral, Qwen3-MoE, Gemma 2, Gemma 3, Phi-3,
SmolLM3, OLMo 2, OLMo 3, gpt-oss, DeepSeek-V3, GLM-4.5, Llama 4 text, Qwen3.5, Qwen3.5-MoE,
Qwen3-Next, Gemma 4 text), a tiny model is written as F16 and loaded by llama.cpp: its
tokenization of the probe strings must equal lm's, and its logits lm's (computed with the weights
rounded to F16, as the file holds them) within 1e-2 of their scale (measured with
llama-cpp-python 0.3.36: at most 3.2e-3, llama and Phi-3; the newer families between 7.9e-4 and
3.1e-3; Qwen3.5, Qwen3.5-MoE and Qwen3-Next 4.4e-3, 5.8e-3 and 5.8e-3, Gemma 4 4.0e-3 and 3.8e-3,
Gemma 4 with experts 3.2e-3;
`pytest -s` prints each). Where lm imports the architecture from GGUF, its reading of the file must
give the same logits too (the hybrids and Gemma 4 are export-only)."""

import jax
import numpy as np
import pytest
import test_gguf
from conftest import tiny_config
from test_gguf import QWEN35, QWEN_MOE

llama_cpp = pytest.importorskip('llama_cpp')

from lm.data import gguf_tokenizer  # noqa: E402
from lm.data import tokenizer as tokenizer_lib  # noqa: E402
from lm.io import gguf as gguf_io  # noqa: E402
from lm.train.state import ModelSpec  # noqa: E402

GEMMA = dict(norm_offset=1.0, embed_scale=True, mlp_activation='gelu_tanh', norm_placement='sandwich',
             head_dim=16, query_pre_attn_scalar=16.0, sliding_window=4)
OLMO = dict(norm_placement='post', qk_norm=True, qk_norm_scope='all')
V3_MOE = dict(n_experts=4, experts_per_token=2, expert_dim=16, router='sigmoid', norm_topk_prob=True,
              shared_dim=16)
# The hybrids' and Gemma 4's tiny models are test_gguf.py's (there without llama.cpp); Gemma 4
# here without its proportional RoPE scaling.
GEMMA4 = {k: v for k, v in test_gguf.GEMMA4.items() if k != 'rope_scaling'}
FAMILIES = {  # lm family (or a label) -> the overrides of its tiny model
    'llama': dict(),
    'qwen2': dict(qkv_bias=True),
    'qwen3': dict(qk_norm=True, hf_family='qwen3', head_dim=16),
    'mixtral': dict(moe=dict(n_experts=4, experts_per_token=2, expert_dim=16, norm_topk_prob=True)),
    'qwen3_moe': dict(qk_norm=True, moe=dict(n_experts=4, experts_per_token=2, expert_dim=16,
                                             norm_topk_prob=True)),
    # A window (4) shorter than the 32 tokens evaluated, layers enough for each default sliding
    # pattern, softcaps small enough to bend these logits; llama.cpp scales queries by
    # head_dim ** -0.5, so query_pre_attn_scalar is the head size.
    'gemma2': dict(GEMMA, hf_family='gemma2', n_layers=3, tie_embeddings=True,
                   attn_logit_softcap=5.0, final_logit_softcap=1.0,
                   layer_types=('sliding', 'full', 'sliding')),
    'gemma3_text': dict(GEMMA, hf_family='gemma3_text', n_layers=7, qk_norm=True, rope_theta=1e6,
                        rope_local_theta=1e4, final_logit_softcap=2.0,
                        layer_types=('sliding',) * 5 + ('full', 'sliding')),
    'phi3': dict(hf_family='phi3'),
    # NoPE on every 4th layer, as llama.cpp's smollm3 graph fixes it; interleaved RoPE (permuted).
    'smollm3': dict(hf_family='smollm3', n_layers=4, rope_layers=(1, 1, 1, 0), tie_embeddings=True),
    # Norms after each part only, q/k norms over all heads; tied embeddings written twice (olmo2's
    # graph requires output.weight). OLMo 3: a window (4) on layers of a pattern not the default.
    'olmo2': dict(OLMO, hf_family='olmo2', tie_embeddings=True),
    'olmo3': dict(OLMO, hf_family='olmo3', n_layers=4, sliding_window=4, rope_theta=5e5,
                  layer_types=('sliding', 'full', 'sliding', 'sliding')),
    # Sinks, alternating sliding (4) and full layers, biases everywhere; top-2 of 4 biased experts
    # by a softmax over the chosen logits, with the clamped SwiGLU llama.cpp fixes (7.0, 1.702).
    'gpt_oss': dict(hf_family='gpt_oss', head_dim=16, qkv_bias=True, attn_out_bias=True,
                    attn_sinks=True, sliding_window=4, layer_types=('sliding', 'full'),
                    moe=dict(n_experts=4, experts_per_token=2, expert_dim=24, router='topk_softmax',
                             router_bias=True, expert_bias=True, swiglu_limit=7.0,
                             swiglu_alpha=1.702)),
    # MLA (q through a rank-12 latent, keys/values through a rank-16 one, 4 rotated dims of 12,
    # interleaved), a dense first layer, then a sigmoid router over 2 groups of 2 experts (one
    # group chosen, top-2, renormalised, scaled by 2.5) and a shared expert.
    'deepseek_v3': dict(hf_family='deepseek_v3', n_layers=3, n_kv_heads=4, head_dim=12,
                        rope_interleaved=True, mlp_types=('dense', 'moe', 'moe'),
                        mla=dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8,
                                 qk_rope_head_dim=4, v_head_dim=8),
                        moe=dict(V3_MOE, n_group=2, topk_group=1, routed_scaling_factor=2.5)),
    # GLM-4.5: q/k/v biases, per-head q/k norms, RoPE on half of each head, then DeepSeek's MoE.
    'glm4_moe': dict(hf_family='glm4_moe', head_dim=16, partial_rotary_factor=0.5, qkv_bias=True,
                     qk_norm=True, mlp_types=('dense', 'moe'),
                     moe=dict(V3_MOE, routed_scaling_factor=1.5)),
    # Llama 4: interleaved RoPE with NoPE every 4th layer, L2 q/k norms, top-1 of 4 experts by
    # sigmoid score (scaling the expert's input) beside a shared expert, every other layer. The
    # chunk (8192) and the query temperature's floor (8192) are what llama.cpp fixes in code, so
    # neither bites within these 32 tokens.
    'llama4_text': dict(hf_family='llama4_text', n_layers=4, head_dim=16, rope_interleaved=True,
                        rope_layers=(1, 1, 1, 0), layer_types=('chunked',) * 3 + ('full',),
                        attention_chunk_size=8192, qk_l2_norm=True,
                        attn_temperature_floor_scale=8192.0, attn_temperature_scale=0.1,
                        mlp_types=('dense', 'moe', 'dense', 'moe'),
                        moe=dict(n_experts=4, experts_per_token=1, expert_dim=16,
                                 router='topk_sigmoid', shared_dim=16)),
    # Qwen3.5: DeltaNet layers (2 key heads, 4 value heads: qwen35 tiles them) and a gated full
    # attention layer with q/k norms and RoPE on half of each head, norms stored as 1 + w.
    'qwen3_5_text': dict(QWEN35, hf_family='qwen3_5_text'),
    # The same stack with softmax top-2 of 4 experts and a sigmoid-gated shared expert in every
    # layer (Qwen3.5-MoE), and as Qwen3-Next writes it (in_proj_qkvz, in_proj_ba; grouped heads).
    'qwen3_5_moe_text': dict(QWEN35, hf_family='qwen3_5_moe_text', moe=QWEN_MOE),
    'qwen3_next': dict(QWEN35, hf_family='qwen3_next', moe=QWEN_MOE),
    # Gemma 4 as E2B: sliding (head 16, window 4) and full layers (head 32, proportional RoPE on a
    # quarter of it), v norms, per-layer input embeddings, the last two layers reusing layers 2
    # and 3's keys and values with MLPs twice as wide, a final softcap.
    'gemma4_text': dict(GEMMA4, n_layers=6, layer_types=('sliding', 'full') * 3,
                        rope_scaling=dict(type='proportional', factor=1.0, partial_rotary_factor=0.25),
                        kv_shared_layers=2, per_layer_input_dim=8, tie_embeddings=True,
                        mlp_types=('dense',) * 4 + ('wide',) * 2, wide_mlp_dim=128,
                        final_logit_softcap=3.0),
    # Gemma 4 as 31B: full layers whose values are their keys' projection, one KV head, RoPE
    # scaled by 2 on half of it; an output projection of its own.
    'gemma4_text_k_eq_v': dict(GEMMA4, n_layers=4, layer_types=('sliding', 'full') * 2,
                               attn_k_eq_v=True, global_kv_heads=1, tie_embeddings=False,
                               rope_scaling=dict(type='proportional', factor=2.0,
                                                 partial_rotary_factor=0.5)),
    # Gemma 4 with the MoE block (26B-A4B) in every layer, attention as the 31B case's: the dense
    # MLP (the shared expert) beside top-2 of 4 experts, each branch with its own norms, the router
    # reading the residual RMS-normed times its learned scale, each expert's weight times its own.
    'gemma4_text_moe': dict(GEMMA4, n_layers=4, layer_types=('sliding', 'full') * 2,
                            attn_k_eq_v=True, global_kv_heads=1, tie_embeddings=True,
                            rope_scaling=dict(type='proportional', factor=1.0,
                                              partial_rotary_factor=0.25),
                            moe=dict(n_experts=4, experts_per_token=2, expert_dim=16,
                                     router='scaled_softmax', norm_topk_prob=True, shared_dim=64,
                                     shared_gate=False, branch_norms=True)),
}
# lm families whose GGUF export lm's own import reads back (model fields and weights).
IMPORTED = ('llama', 'qwen2', 'qwen3', 'mixtral', 'qwen3_moe', 'gemma2', 'gemma3_text', 'phi3',
            'smollm3', 'olmo2', 'olmo3')


def _well_conditioned(params: dict) -> dict:
  """Weights that keep a tiny random hybrid or Gemma 4 model from magnifying the F16 rounding
  llama.cpp applies to activations (its F16 matmuls round their inputs; its cache holds F16 keys):
  lm's own logits, with its matmul inputs rounded so, moved by up to 1.1e-2 (Qwen3.5) and 7e-2
  (Qwen3.5-MoE, an expert choice flipping) with DeltaNet decays A = exp(A_log) up to 16 as
  initialised, under 7e-3 with A in [0.01, 0.2]; Gemma 4's unscaled attention (q, k RMS-normed)
  reaches logits of the head size, where F16 keys move them by about 1e-2, so its query norms
  are halved; Gemma 4's router scales and branch norms, ones as initialised, are drawn from
  [0.5, 1.5] so that a misplaced one shows (post_ffw_norm_1 and _2 swapped, or either router
  scale written as ones, moved llama.cpp's logits by 0.46 to 1.2 of their scale). (Written with F32 weights and run with an F32 cache, like models matched lm's
  logits within 6.7e-4, Qwen3.5 and Qwen3-Next, and 2.6e-3, Gemma 4: the layouts are exact.)"""
  out, rng = {}, np.random.default_rng(0)
  for name, value in params.items():
    if name.endswith('linear_attn.A_log'):
      out[name] = np.log(rng.uniform(0.01, 0.2, value.shape)).astype(np.float32)
    elif name.endswith('q_norm.scale') and 'layers.layer_scale.scale' in params:  # Gemma 4
      out[name] = np.asarray(value) * np.float32(0.5)
    elif name.startswith('layers.moe.') and name.endswith('scale'):  # Gemma 4's router, branches
      out[name] = rng.uniform(0.5, 1.5, value.shape).astype(np.float32)
  return out


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  import pydoc_data.topics
  docs = [t for t in pydoc_data.topics.topics.values()]
  path = tmp_path_factory.mktemp('tok') / 'sp.model'
  return tokenizer_lib.train_tokenizer(docs, str(path), 512)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_llama_cpp_reads_lms_export_with_the_same_tokens_and_logits(tokenizer, tmp_path, family):
  c = tiny_config(vocab_size=512, max_seq_len=64)
  overrides = dict(FAMILIES[family])
  c.model.moe.update(overrides.pop('moe', {}))
  c.model.mla.update(overrides.pop('mla', {}))
  c.model.linear_attn.update(overrides.pop('linear_attn', {}))
  c.model.update(overrides)
  spec = ModelSpec(c.model)
  params = {k: v if k.endswith(('scale', 'bias')) else v.astype(np.float16).astype(np.float32)
            for k, v in jax.jit(spec.init)(jax.random.key(0)).items()}
  params.update(_well_conditioned(params))
  path = tmp_path / f'{family}.gguf'
  gguf_io.save(str(path), params, c.model, tokenizer, dtype='f16')
  llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
  for text in gguf_tokenizer.PROBES:
    assert llm.tokenize(text.encode('utf-8'), add_bos=False, special=False) == tokenizer.encode(text)
  tokens = tokenizer.encode('def f(x):\n    return x + 1', bos=True)[:32]
  llm.reset()
  llm.eval(tokens)
  got = np.asarray(llm.scores[:len(tokens)], np.float32)
  forward = lambda s, p: np.asarray(jax.jit(lambda p: s.bind(p)(np.asarray([tokens], np.int32)))(p))[0]
  want = forward(spec, params)
  error = np.max(np.abs(got - want)) / np.max(np.abs(want))
  print(f'{family}: max |dlogit| {error:.1e} of the logits\' scale')
  assert error <= 1e-2
  if family in IMPORTED:  # and lm reads its own file back to the same model
    c.model.update(gguf_io.model_config(str(path)))
    back = ModelSpec(c.model)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = gguf_io.load_params(str(path), back, {n: one for n in back.names})
    np.testing.assert_allclose(forward(back, loaded), want, rtol=0, atol=1e-4 * np.max(np.abs(want)))
