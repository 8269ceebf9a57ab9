"""Run configuration: defaults, model presets, loading `configs/*.py` files and applying overrides.

Configs follow the big_vision convention: a Python file with `get_config(arg)` returning an
`ml_collections.ConfigDict`. Every config starts from `base_config()` so that every key a run can
set exists here, with its default, and a locked config rejects anything else.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import weakref

import ml_collections
from ml_collections import config_dict

from lm.errors import ConfigError

# Model shapes. `tiny` runs in seconds on a laptop CPU; the others follow the published
# Llama-family shapes at those sizes (125M is GPT-3 small's shape with Llama components).
MODEL_PRESETS = {
    'tiny': dict(vocab_size=2048, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, mlp_dim=384),
    '125m': dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, mlp_dim=2048),
    '1b': dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_dim=8192,
               rope_theta=500000.0, tie_embeddings=True, max_seq_len=8192,
               rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_seq_len=8192)),
    '8b': dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
               rope_theta=500000.0, max_seq_len=8192,
               rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_seq_len=8192)),
    # Llama-3.1-70B (transformers' LlamaConfig from its published config.json).
    '70b': dict(vocab_size=128256, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_dim=28672,
                rope_theta=500000.0, max_seq_len=8192,
                rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                  original_max_seq_len=8192)),
    # Qwen3-32B (its published config.json): head_dim 128 is not d_model / n_heads (80), RMSNorm on
    # each head's q and k, untied embeddings.
    'qwen3-32b': dict(vocab_size=151936, d_model=5120, n_layers=64, n_heads=64, n_kv_heads=8,
                      head_dim=128, mlp_dim=25600, rope_theta=1000000.0, norm_eps=1e-6,
                      max_seq_len=40960, qk_norm=True),
    # DeepSeek-V3's width and MLA dims (transformers' DeepseekV3Config defaults) with 4 dense layers
    # instead of its 3 dense + 58 Mixture-of-Experts ones, whose routing arrives with issue 26.
    'deepseek-v3-small': dict(vocab_size=129280, d_model=7168, n_layers=4, n_heads=128,
                              n_kv_heads=128, head_dim=192, mlp_dim=18432, norm_eps=1e-6,
                              max_seq_len=4096,
                              mla=dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                                       qk_rope_head_dim=64, v_head_dim=128),
                              rope_interleaved=True),
    # Qwen3.5-9B's text model (8.95B): transformers' Qwen3_5TextConfig defaults with the published
    # RoPE base and context; 8 x (3 gated DeltaNet + 1 gated full attention) layers.
    'qwen3.5-9b': dict(vocab_size=248320, d_model=4096, n_layers=32, n_heads=16, n_kv_heads=4,
                       head_dim=256, mlp_dim=12288, rope_theta=10000000.0, norm_eps=1e-6,
                       max_seq_len=262144, layer_types=('linear', 'linear', 'linear', 'full') * 8,
                       partial_rotary_factor=0.25, attn_output_gate=True, qk_norm=True,
                       norm_offset=1.0, linear_attn=dict(n_key_heads=16, n_value_heads=32,
                                                         key_head_dim=128, value_head_dim=128)),
    # DeepSeek-V3 (671B; 37B active per token) as lm imports its published config.json: MLA in
    # every layer, 3 dense layers then 58 of 256 routed experts (top 8 from 4 of 8 groups, sigmoid
    # scores, routed scaling 2.5) beside one shared expert.
    'deepseek-v3': dict(vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, n_kv_heads=128,
                        head_dim=192, mlp_dim=18432, max_seq_len=163840, norm_eps=1e-6,
                        rope_theta=10000.0,
                        rope_scaling=dict(type='yarn', factor=40.0, original_max_seq_len=4096,
                                          beta_fast=32.0, beta_slow=1.0, truncate=True,
                                          mscale=1.0, mscale_all_dim=1.0),
                        mla=dict(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128,
                                 qk_rope_head_dim=64, v_head_dim=128),
                        rope_interleaved=True, hf_family='deepseek_v3',
                        mlp_types=('dense',) * 3 + ('moe',) * 58,
                        moe=dict(n_experts=256, experts_per_token=8, expert_dim=2048,
                                 router='sigmoid', n_group=8, topk_group=4,
                                 routed_scaling_factor=2.5, norm_topk_prob=True, shared_dim=2048)),
    # gpt-oss-20b (21B; 3.6B active) as lm imports its published config.json: sliding (128) and
    # full attention alternating, with sinks and biases; 32 biased experts, top 4, clamped SwiGLU.
    'gpt-oss-20b': dict(vocab_size=201088, d_model=2880, n_layers=24, n_heads=64, n_kv_heads=8,
                        head_dim=64, mlp_dim=2880, max_seq_len=131072, norm_eps=1e-5,
                        rope_theta=150000.0,
                        rope_scaling=dict(type='yarn', factor=32.0, original_max_seq_len=4096,
                                          beta_fast=32.0, beta_slow=1.0, truncate=False),
                        qkv_bias=True, attn_out_bias=True, attn_sinks=True, sliding_window=128,
                        layer_types=('sliding', 'full') * 12, hf_family='gpt_oss',
                        moe=dict(n_experts=32, experts_per_token=4, expert_dim=2880,
                                 router='topk_softmax', router_bias=True, expert_bias=True,
                                 swiglu_limit=7.0, swiglu_alpha=1.702)),
}


ROPE_SCALING_TYPES = ('llama3', 'linear', 'yarn', 'proportional')  # model.rope_scaling['type'] (lm/model/rope.py)
# Per layer kinds (lm/model/stack.py): the token mixer ('linear': gated DeltaNet) and channel mixer.
LAYER_TYPES = ('full', 'sliding', 'chunked', 'linear')
MLP_TYPES = ('dense', 'moe', 'wide')


def layer_problem(m) -> str | None:
  """The one-line problem with model config `m`'s per-layer kinds, or None."""
  for key, allowed in (('layer_types', LAYER_TYPES), ('mlp_types', MLP_TYPES),
                       ('rope_layers', (0, 1))):
    values = tuple(m.get(key) or ())
    if values and len(values) != m.n_layers:
      return (f'model.{key} has {len(values)} entries for {m.n_layers} layers; give one per '
              'layer or () for all alike')
    bad = [v for v in values if v not in allowed]
    if bad:
      return (f'model.{key} entry {bad[0]!r} is not supported; lm implements '
              f'{", ".join(map(str, allowed))}')
  types = tuple(m.get('layer_types') or ())
  if 'chunked' in types and not m.get('attention_chunk_size'):
    return "model.layer_types has 'chunked' layers but model.attention_chunk_size is 0; set it"
  if 'linear' in types and not (m.linear_attn.n_key_heads and m.linear_attn.n_value_heads
                                and m.linear_attn.key_head_dim and m.linear_attn.value_head_dim):
    return ("model.layer_types has 'linear' (gated DeltaNet) layers but model.linear_attn's "
            'head counts and dims are not all set')
  if 'moe' in tuple(m.get('mlp_types') or ()) and not n_experts(m):
    return "model.mlp_types has 'moe' layers but model.moe.n_experts is 0; set the number of experts"
  if 'wide' in tuple(m.get('mlp_types') or ()) and not m.get('wide_mlp_dim'):
    return "model.mlp_types has 'wide' layers but model.wide_mlp_dim is 0; set their hidden size"
  return kv_sharing_problem(m)


def kv_sharing_problem(m) -> str | None:
  """The one-line problem with `model.kv_shared_layers` (Gemma 4), or None."""
  shared = int(m.get('kv_shared_layers') or 0)
  if not shared:
    return None
  types = tuple(m.get('layer_types') or ('sliding',) * m.n_layers)
  if shared >= m.n_layers:
    return (f'model.kv_shared_layers={shared} leaves no layer of the {m.n_layers} to compute the '
            'keys and values they reuse; set it below model.n_layers')
  if not set(types) <= {'sliding', 'full'} or mla_enabled(m):
    return ('model.kv_shared_layers > 0 needs softmax attention layers of types sliding and full '
            f'only; this model has {", ".join(sorted(set(types)))}' + (' with MLA' if mla_enabled(m) else ''))
  first = m.n_layers - shared
  lacking = sorted(set(types[first:]) - set(types[:first]))
  if lacking:
    return (f'model.kv_shared_layers={shared}: the shared {lacking[0]} layers have no earlier '
            f'{lacking[0]} layer to take keys and values from; share fewer layers')
  return None


def global_attention_layers(m) -> bool:
  """Whether 'full' attention layers are a part of their own (Gemma 4's global attention: their
  own head dim and KV heads, keys as values; with KV sharing they also keep their own K/V)."""
  return bool(m.get('global_head_dim') or m.get('global_kv_heads') or m.get('attn_k_eq_v')
              or m.get('kv_shared_layers'))


def model_config(preset: str = 'tiny') -> ml_collections.ConfigDict:
  """The model section: Llama-family decoder, configured rather than forked (Qwen2 = qkv_bias)."""
  if preset not in MODEL_PRESETS:
    raise ConfigError(f'unknown model preset {preset!r}; choose one of {sorted(MODEL_PRESETS)}')
  m = ml_collections.ConfigDict(dict(
      vocab_size=2048,
      d_model=128,
      n_layers=2,
      n_heads=4,
      n_kv_heads=2,
      head_dim=0,  # 0: d_model // n_heads
      mlp_dim=384,
      max_seq_len=2048,  # longest sequence the positions support; data.seq_len must fit
      rope_theta=10000.0,
      # RoPE frequency scaling: {'type': 'llama3' (the default) | 'linear' | 'yarn', 'factor', ...}
      # with the fields Hugging Face uses (lm/io/hf.py); None leaves RoPE unscaled.
      rope_scaling=config_dict.placeholder(dict),
      qkv_bias=False,
      tie_embeddings=False,
      norm_eps=1e-5,
      # Family variants (lm/io/hf.py sets them from a Hugging Face config.json; defaults are Llama's).
      norm_offset=0.0,  # RMSNorm multiplies by (norm_offset + scale): 0 Llama, 1 Gemma
      embed_scale=False,  # multiply embeddings by sqrt(d_model) (Gemma)
      mlp_activation='silu',  # silu (SwiGLU: Llama, Mistral, Qwen2) | gelu_tanh (GeGLU: Gemma)
      sliding_window=0,  # attend to at most this many latest positions (Mistral v0.1); 0: all
      layer_types=(),  # per layer token mixer (lm/model/stack.py): full | sliding (sliding_window) | chunked (attention_chunk_size: Llama 4) attention, or linear (gated DeltaNet: Qwen3.5, Qwen3-Next); (): all alike
      mlp_types=(),  # per layer channel mixer: 'dense' | 'moe' | 'wide' (a dense MLP of wide_mlp_dim: Gemma 4's KV-shared layers); (): every layer moe when moe.n_experts > 0, else dense
      wide_mlp_dim=0,  # hidden size of 'wide' MLP layers (Gemma 4 use_double_wide_mlp: 2 x mlp_dim)
      rope_layers=(),  # per layer 1 (RoPE) or 0 (NoPE: SmolLM3, Llama 4); (): RoPE everywhere
      partial_rotary_factor=1.0,  # share of each head's dims that RoPE rotates (Qwen3.5, Qwen3-Next: 0.25)
      attention_chunk_size=0,  # 'chunked' layers attend within chunks of this many positions
      attn_output_gate=False,  # attention output times sigmoid(gate(x)) per head and dim (Qwen3.5, Qwen3-Next)
      attn_sinks=False,  # a learned logit per head joining each softmax (gpt-oss); XLA attention only
      rope_interleaved=False,  # RoPE rotates dims (2i, 2i+1) (Llama 4, GLM) instead of the two halves
      qk_l2_norm=False,  # q and k RMS-normalised without weights after RoPE, on RoPE layers (Llama 4 use_qk_norm)
      attn_temperature_floor_scale=0.0,  # NoPE layers scale q by 1 + attn_temperature_scale * log(1 + floor((pos + 1) / this)) (Llama 4); 0: off
      attn_temperature_scale=0.0,
      norm_placement='pre',  # RMSNorm before each part (pre: Llama), before and after (sandwich: Gemma 2/3), after only (post: OLMo 2/3)
      qk_norm_scope='head',  # q/k norms per head (head: Qwen3, Gemma 3) or over all heads at once (all: OLMo 2/3)
      # Gated DeltaNet ('linear' layers, lm/model/mixers/gated_deltanet.py).
      linear_attn=ml_collections.ConfigDict(dict(
          n_key_heads=0,  # q/k heads (HF linear_num_key_heads)
          n_value_heads=0,  # v heads, a multiple of n_key_heads (HF linear_num_value_heads)
          key_head_dim=0,  # q/k head dim (HF linear_key_head_dim)
          value_head_dim=0,  # v head dim (HF linear_value_head_dim)
          conv_kernel=4,  # the short causal depthwise convolution's width (HF linear_conv_kernel_dim)
      )),
      # Multi-head latent attention (DeepSeek-V3, lm/model/mixers/mla.py) in every attention layer:
      # keys and values come from one kv_lora_rank latent per token, which is all the decoding cache holds.
      mla=ml_collections.ConfigDict(dict(
          kv_lora_rank=0,  # latent width of keys and values; 0: no MLA
          q_lora_rank=0,  # latent width of queries; 0: queries projected from x directly
          qk_nope_head_dim=0,  # per-head query/key dims without RoPE
          qk_rope_head_dim=0,  # per-head query dims with RoPE; one rotated key of this width is shared by all heads
          v_head_dim=0,  # per-head value dims
      )),
      rope_local_theta=0.0,  # RoPE base of 'sliding' layers, unscaled (Gemma 3); 0: as full layers
      # Gemma 4 (lm/model/mixers/attention.py, per_layer_input.py; docs/models.md).
      global_head_dim=0,  # head dim of 'full' attention layers; 0: head_dim
      global_kv_heads=0,  # KV heads of 'full' attention layers; 0: n_kv_heads
      attn_k_eq_v=False,  # 'full' layers take their values from the key projection (no v weights)
      v_norm=False,  # weightless RMSNorm over each value head
      kv_shared_layers=0,  # the last this many layers reuse the keys/values of the last earlier layer of their type (sliding/full)
      per_layer_input_dim=0,  # per-layer input embeddings: a second [vocab, n_layers x this] table gated into each layer; 0: none
      per_layer_input_vocab=0,  # rows of that table; 0: vocab_size
      layer_scale=False,  # each layer's output times a learned scalar
      attn_out_bias=False,  # a bias on the attention output projection (Llama attention_bias)
      mlp_bias=False,  # biases on gate/up/down (Llama mlp_bias)
      qk_norm=False,  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3, Qwen3-MoE, Gemma 3)
      query_pre_attn_scalar=0.0,  # attention logits scale by this ** -0.5; 0: head_dim (Gemma 2/3 set it)
      attn_logit_softcap=0.0,  # c · tanh(logits / c) on attention logits (Gemma 2); 0: off
      final_logit_softcap=0.0,  # the same on the output logits (Gemma 2/3); 0: off
      hf_family='',  # the Hugging Face model_type export writes (set by import); '': inferred
      # Mixture-of-Experts feed-forward in every layer (docs/moe.md); n_experts=0: a dense MLP.
      moe=ml_collections.ConfigDict(dict(
          n_experts=0,  # experts per layer; 0: dense model
          experts_per_token=2,  # k: experts each token is routed to
          expert_dim=0,  # each expert's hidden size; 0: model.mlp_dim
          norm_topk_prob=True,  # renormalise the k routing weights to sum to 1 (Mixtral: always; Qwen3-MoE: its config)
          implementation='ragged',  # ragged (dropless grouped matmul) | dense (every expert on every token: reference)
          capacity_factor=0.0,  # expert parallelism (mesh.shape.expert > 1): each device sends each expert device at most this x its even share of copies; 0: dropless
          aux_loss_weight=0.01,  # load-balancing loss weight in the objective (HF router_aux_loss_coef)
          z_loss_weight=0.001,  # router z-loss weight (ST-MoE)
          router='softmax',  # softmax (Mixtral, Qwen3-MoE/Next/3.5) | sigmoid (DeepSeek-V3, GLM-4.5) | topk_softmax (gpt-oss) | topk_sigmoid (Llama 4) | scaled_softmax (Gemma 4); lm/model/routers.py
          router_bias=False,  # a learned bias on the router logits (gpt-oss)
          n_group=1,  # sigmoid router: experts in n_group groups, tokens pick from topk_group of them
          topk_group=1,  # groups each token picks its experts from (at most n_group)
          routed_scaling_factor=1.0,  # the routing weights times this (DeepSeek-V3, GLM-4.5)
          bias_update_rate=0.0,  # sigmoid router: aux-loss-free balancing step on the correction bias; 0: off
          shared_dim=0,  # hidden size of a shared expert every token goes through; 0: none
          shared_gate=False,  # the shared expert's output times sigmoid(x . w) (Qwen3-Next, Qwen3.5-MoE)
          branch_norms=False,  # Gemma 4: the shared expert (its dense MLP) and the experts as two branches, each with its own pre and post norm, the router reading the un-normed residual; needs shared_dim > 0 and sandwich norms
          expert_bias=False,  # biases on every expert's gate/up/down (gpt-oss)
          swiglu_limit=0.0,  # > 0: gpt-oss's clamped SwiGLU, (clip(up)+1) * g*sigmoid(alpha*g), g clipped
          swiglu_alpha=1.702,  # the clamped SwiGLU's sigmoid slope (gpt-oss: 1.702)
      )),
      # LoRA adapters on the linear layers whose names match `targets` (docs/finetuning.md).
      lora=ml_collections.ConfigDict(dict(
          rank=0,  # 0: no adapters
          alpha=16.0,  # scale = alpha / rank (alpha / sqrt(rank) with rslora)
          dropout=0.0,  # dropout on the adapter's input, in training only
          rslora=False,  # rank-stabilised scaling alpha / sqrt(rank)
          targets=r'layers\.(attn\w*|linear_attn|mlp\w*|moe)\.',  # regex searched in layers.attn.{q,k,v,o} (and Gemma 4's attn_global, attn_reuse, ...), layers.mlp.{gate,up,down}, layers.moe.{gate,up,down}, layers.linear_attn.*, lm_head
      )),
      # QLoRA: the layers' linear kernels stored quantized and frozen, dequantized per layer in
      # the forward (lm/model/quant.py, docs/posttraining.md); needs a partition that trains none of them.
      quant=ml_collections.ConfigDict(dict(
          type='none',  # none | int8 | nf4
          block=64,  # entries per scale, along each kernel's largest input axis
      )),
      param_dtype='float32',
      compute_dtype='float32',
      remat='none',  # none | full | dots | dots_no_batch
      scan_layers=config_dict.placeholder(bool),  # None: scan above 4 layers, unroll up to 4 (lm/model/transformer.py); True: always lax.scan (compile time independent of depth); False: unroll
      attention='auto',  # auto | xla | cudnn | pallas (docs/attention.md)
      context_parallel='all_gather',  # with mesh.shape.context > 1: all_gather (every device gathers all K/V) | ring (K/V blocks pass around the context devices; docs/attention.md)
      # The [B, T, V] logits never exist whole: lm/train/losses.py.
      loss_chunk_size=512,  # sequence positions per chunk of the loss's unembedding and softmax; 0: whole logits
  ))
  m.update(MODEL_PRESETS[preset])
  return m


def with_model_defaults(m) -> ml_collections.ConfigDict:
  """Model config `m` with any key it lacks at its default: runs saved by an older lm load."""
  def fill(defaults: dict, given: dict) -> dict:
    out = dict(defaults)
    for key, value in given.items():
      out[key] = fill(defaults[key], value) if isinstance(defaults.get(key), dict) and isinstance(
          value, dict) else value
    return out
  given = m.to_dict() if hasattr(m, 'to_dict') else dict(m)
  if 'post_norms' in given:  # runs saved before norm_placement: post_norms=True was 'sandwich'
    given = dict(given)
    given.setdefault('norm_placement', 'sandwich' if given.pop('post_norms') else 'pre')
  return ml_collections.ConfigDict(fill(model_config().to_dict(), given))


def base_config() -> ml_collections.ConfigDict:
  """Every key a run understands, with its default."""
  c = ml_collections.ConfigDict()
  c.model = model_config('tiny')

  c.data = ml_collections.ConfigDict(dict(
      train_files=config_dict.placeholder(str),  # path, glob, comma-separated list, tfds:NAME[:SPLIT], builtin:python-docs (docs/data.md)
      eval_files=config_dict.placeholder(str),  # None: hold out `eval_fraction` of documents
      eval_fraction=0.05,
      text_field='text',  # jsonl/json field holding the document text
      tokenizer=config_dict.placeholder(str),  # a SentencePiece .model, a tokenizer.json or its folder; None: train one into the workdir
      tokenizer_vocab_size=2048,
      tokenizer_model_type='bpe',  # bpe | unigram (only used when training one)
      seq_len=256,
      batch_size=8,  # global batch, in sequences
      seed=0,
      # Data pipeline: docs/data.md.
      format='text',  # text | alpaca | chat | preference | kto
      fields='',  # column mapping for jsonl/json/parquet records, e.g. 'instruction=question,output=answer'
      chat_template='auto',  # auto (the tokenizer's own, else plain) | llama3 | chatml | gemma | mistral | plain | tokenizer | PATH.jinja
      train_on='assistant',  # loss on: assistant (every reply) | last (last reply) | all tokens
      truncate='prompt',  # an example over seq_len: prompt (cut the prompt, keep the answer) | skip | fail
      packing='auto',  # auto (text: stream, sft: whole, preference: none) | stream | whole | none
      bad_records='fail',  # malformed lines, missing fields, bad UTF-8: fail | skip (and count)
      text_split='paragraph',  # text files: documents are paragraph (blank-line separated) | line | file
      tfds_data_dir=config_dict.placeholder(str),  # TFDS data_dir; None: TFDS's default
      eval_max_examples=2000,  # cap on held-out records when eval_files is unset
      # Several sources: ({'train_files': ..., 'weight': 0.8, 'format': 'alpaca'}, ...); each entry
      # may also set name, eval_files, fields, text_field, chat_template, ... (pipeline.SOURCE_KEYS).
      mixture=(),  # weighted sources, each a dict of data keys; () reads train_files
      prefetch=2,  # batches prepared ahead in a background thread; 0: none
      streaming='auto',  # auto (a Hub dataset streams while the Hub is reachable) | true (hf: and local files) | false
      shuffle_buffer=10_000,  # a streamed source's shuffle buffer, in records; 0: read in order
  ))

  c.optimizer = ml_collections.ConfigDict(dict(
      name='adamw',  # adamw | adafactor | lion | sgd
      lr=3e-4,
      schedule='cosine',  # cosine | linear | constant
      warmup_steps=100,
      end_lr_ratio=0.1,  # final lr = lr * end_lr_ratio for cosine/linear
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip=1.0,  # global-norm clip over the trainable parameters; 0 disables
      # Parameter-name substrings exempt from weight decay: norms, biases, embeddings.
      no_decay=('norm', 'bias', 'embed'),
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=1000,
      microbatches=1,  # gradient accumulation: the batch is split into this many sequential pieces
      seed=0,
      log_every=10,
      eval_every=200,  # steps between held-out evaluations (eval loss, train.eval_tasks)
      eval_batches=8,
      checkpoint_every=500,
      keep_every=0,  # also keep every checkpoint whose step is a multiple of this; 0: only the latest
      async_checkpoint=True,  # write checkpoints in the background while training continues
      grace_seconds=120.0,  # after SIGTERM/SIGINT: time to checkpoint and exit before a hard exit
      # Numerical guard (lm/train/guard.py): a step with a non-finite loss or gradient is skipped.
      max_bad_steps=5,  # this many skipped steps in a row stop the run (exit 3)
      spike_zscore=0.0,  # also skip a loss this many std devs above the recent window; 0: off
      spike_window=100,  # accepted losses the spike check compares against
      keep_checkpoints=3,
      trainable='all',  # which parameters train: all | lora | bitfit | norms | ...; lm/train/partition.py
      # bfloat16 halves a LoRA/QLoRA base: exact for weights the forward reads in compute_dtype
      # (embeddings, head, kernels); norms and quantization scales round once.
      frozen_dtype='param_dtype',  # storage dtype of the floating parameters train.trainable freezes; param_dtype: as the rest (docs/plan.md)
      offload='device',  # where the optimizer state lives between steps: device | host (pinned host memory, streamed each step; docs/plan.md)
      objective='next_token_xent',  # next_token_xent | dpo | ipo | simpo | orpo | kto | distill | grpo (lm/train/objectives.py, docs/posttraining.md)
      init_from=config_dict.placeholder(str),  # start from an lm run dir or a HF model dir; sets model shape and tokenizer
      eval_tasks='',  # built-in task names or task files (lm/eval/tasks.py), comma-separated, run at every evaluation; logged as task/metric
      eval_task_limit=50,  # examples per task at each evaluation
      early_stopping_metric='',  # '' never stops; else e.g. eval_loss or gsm8k_nll/answer_perplexity
      early_stopping_patience=3,  # evaluations without improvement before stopping
      early_stopping_min_delta=0.0,  # smallest change that counts as an improvement
      # Resuming checks the run's identity.json; name parts that may change deliberately:
      resume_changes='',  # comma-separated: model, tokenizer, data, objective, partition, all
      # Experiment trackers (lm/train/trackers.py, docs/trackers.md): tensorboard, wandb, trackio.
      trackers='tensorboard',  # comma-separated; each gets the config, step metrics, evals, summary
      tracker_project='lm',  # the W&B / Trackio project; the run is named after the workdir
      tracker_errors='fail',  # a tracker that fails to start: fail (exit 2) | warn (train without it)
  ))

  c.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,  # strength of the pull towards the reference policy
      label_smoothing=0.0,  # conservative DPO: assumed share of flipped preference labels
  ))

  # The rest of the DPO family (docs/posttraining.md); dpo.beta is also IPO's and KTO's beta.
  c.preference = ml_collections.ConfigDict(dict(
      simpo_beta=2.0,  # SimPO: reward = simpo_beta * mean token log-probability of a reply
      simpo_gamma=1.0,  # SimPO: target reward margin between chosen and rejected
      orpo_weight=0.1,  # ORPO: weight of the odds-ratio term added to the chosen reply's NLL
      kto_desirable_weight=1.0,  # KTO: loss weight of desirable examples
      kto_undesirable_weight=1.0,  # KTO: loss weight of undesirable examples
  ))

  # Logit distillation from a frozen teacher (train.objective=distill, docs/posttraining.md).
  c.distill = ml_collections.ConfigDict(dict(
      teacher=config_dict.placeholder(str),  # an lm run or HF model directory with the student's tokenizer (any size)
      loss='forward_kl',  # forward_kl (KL(teacher||student)) | reverse_kl | jsd
      temperature=1.0,  # both distributions softened by this; the term is scaled by temperature^2
      weight=0.5,  # loss = (1 - weight) * SFT cross-entropy + weight * distillation term
      jsd_beta=0.5,  # jsd: mixture weight of the teacher in M = beta * teacher + (1 - beta) * student
  ))

  # GRPO with verifiable rewards (train.objective=grpo, lm/train/grpo_loop.py, docs/posttraining.md).
  # data.batch_size rows per round: batch_size / group_size prompts, group_size completions each.
  c.grpo = ml_collections.ConfigDict(dict(
      prompts=config_dict.placeholder(str),  # .jsonl/.json of records, e.g. ../shared/data/gsm8k/train.jsonl
      environment='',  # module.Class[:ARG] of an lm.eval.environments.Environment (e.g. lm.eval.environments.ReasoningGym:chain_sum); '': score with grpo.rewards
      on_error='stop',  # an environment or tool that raises, times out or returns malformed output: stop (the run, checkpoint written) | skip (the round)
      env_timeout_s=30.0,  # the longest one environment call (tool or reward) may take; 0: no limit
      eval_size=0,  # prompt records held out (the last ones) for the held-out reward; 0: none
      eval_every=0,  # rounds between held-out reward evaluations (also one before training); 0: never
      prompt_format='Question: {question}\nAnswer:',  # str.format over the record's fields
      chat_template='',  # '': the formatted prompt as plain text; else a data.chat_template name (tokenizer, chatml, auto, PATH.jinja): it is the user turn, completions stop at the end of the turn
      rewards='lm.eval.rewards.gsm8k_exact',  # comma-separated dotted names of fn(completion, record) -> float
      reward_weights=(),  # one weight per reward; () weighs each 1.0
      group_size=4,  # G: completions sampled per prompt
      updates_per_batch=1,  # optimizer steps on each sampled batch (train.steps counts these)
      overlap=False,  # sample round r + 1 while round r trains (one round off-policy; docs/posttraining.md)
      sampler_devices=0,  # devices set apart for sampling (the last N; the trainer gets the rest, weights copied over each round); 0: shared
      max_new_tokens=64,  # completion length limit
      temperature=1.0,  # sampling temperature
      top_k=0,
      top_p=1.0,
      stop=('Question:',),  # strings that end a completion
      clip_low=0.2,  # ratio clipped to [1 - clip_low, 1 + clip_high]
      clip_high=0.2,  # > clip_low: DAPO's clip-higher
      kl_coef=0.04,  # weight of the KL penalty to the reference; 0: no reference pass
      loss_type='grpo',  # grpo (mean per completion) | dapo (mean per token) | dr_grpo (sum / max_new_tokens)
      scale_rewards=True,  # divide advantages by the group's reward std (Dr. GRPO: False)
      importance_level='token',  # token: GRPO's per-token ratio | sequence: GSPO's length-normalised sequence ratio
      teacher_coef=0.0,  # > 0: on-policy distillation from distill.teacher, per-token advantage -coef * (log p_student - log p_teacher)
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      # Axis sizes; one -1 takes the remaining devices.
      # expert > 1 splits the experts of Mixture-of-Experts layers (expert parallelism, docs/moe.md);
      # context > 1 splits each sequence over that many devices (context parallelism: attention
      # all-gathers K/V or passes it around a ring, model.context_parallel; docs/attention.md), for
      # sequences whose activations fit no one device.
      shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1, expert=1)),
      # Logical axis -> mesh axes. A parameter's logical names are declared where it is created.
      rules=(
          ('batch', ('data', 'fsdp', 'expert')),
          ('vocab', 'tensor'),
          ('embed', 'fsdp'),
          ('mlp', 'tensor'),
          ('heads', 'tensor'),
          ('kv_heads', 'tensor'),
          ('head_dim', None),
          ('layers', None),
          ('expert', 'expert'),  # expert parallelism: each device holds E / mesh.shape.expert experts
      ),
  ))

  # Multi-host runs (lm/distributed.py). The LM_* environment variables the launchers set take
  # precedence; with none of these set, a single process drives the local devices.
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False,  # True: jax.distributed.initialize(), auto-detecting SLURM / TPU / GKE clusters
      coordinator_address=config_dict.placeholder(str),  # host:port of process 0
      num_processes=config_dict.placeholder(int),  # None: LM_NUM_PROCESSES or auto-detected
      process_id=config_dict.placeholder(int),  # None: LM_PROCESS_ID or auto-detected
  ))

  c.metrics = ml_collections.ConfigDict(dict(
      # Peak FLOP/s per device for MFU; 0 uses the known figure for the device kind
      # (lm/train/flops.py) or, on CPU, a matmul rate measured once per machine and cached in
      # ~/.cache/lm/cpu_peak.json (delete it on an idle machine to measure again).
      peak_flops_per_device=0.0,
      tensorboard=True,  # False drops tensorboard from train.trackers (the older switch)
  ))
  return c


# --- The schema: what every key may hold, checked once when a config is loaded ------------------
#
# Types come from the defaults above (a locked ConfigDict keeps each key's type); these say which
# values are allowed. Choices duplicate the names the lower layers define (attention, objectives,
# data formats) because this module imports none of them; tests/test_config.py checks they agree.


@dataclasses.dataclass(frozen=True)
class Bounds:
  """lo <= value (< or <=) hi; `also` lists extra allowed values (a mesh axis of -1)."""
  lo: float | None = None
  hi: float | None = None
  hi_open: bool = False
  lo_open: bool = False
  also: tuple = ()

  def problem(self, value) -> str | None:
    if value in self.also:
      return None
    low = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
    high = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
    return None if low and high else self.describe()

  def describe(self) -> str:
    if self.hi is None:
      text = ('must be positive' if self.lo == 0 and self.lo_open else
              'must not be negative' if self.lo == 0 else f'must be at least {self.lo:g}')
    else:
      text = (f'must be in {"(" if self.lo_open else "["}{self.lo:g}, {self.hi:g}'
              f'{")" if self.hi_open else "]"}')
    return text + ''.join(f' or {a}' for a in self.also)


@dataclasses.dataclass(frozen=True)
class Choice:
  options: tuple

  def problem(self, value) -> str | None:
    return None if value in self.options else f'choose {_spoken(self.options)}'

  def describe(self) -> str:
    return 'one of ' + ', '.join(f'`{o}`' for o in self.options)


def _spoken(options) -> str:
  names = [str(o) for o in options]
  return names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' or ' + names[-1]


POSITIVE, NOT_NEGATIVE, AT_LEAST_ONE = Bounds(0, lo_open=True), Bounds(0), Bounds(1)
FRACTION = Bounds(0, 1, hi_open=True)  # [0, 1)
DTYPES = ('float32', 'bfloat16', 'float16')

SCHEMA = {
    'model.vocab_size': AT_LEAST_ONE, 'model.d_model': AT_LEAST_ONE, 'model.n_layers': AT_LEAST_ONE,
    'model.n_heads': AT_LEAST_ONE, 'model.n_kv_heads': AT_LEAST_ONE, 'model.head_dim': NOT_NEGATIVE,
    'model.mlp_dim': AT_LEAST_ONE, 'model.max_seq_len': AT_LEAST_ONE, 'model.rope_theta': POSITIVE,
    'model.norm_eps': POSITIVE, 'model.sliding_window': NOT_NEGATIVE,
    'model.rope_local_theta': NOT_NEGATIVE, 'model.query_pre_attn_scalar': NOT_NEGATIVE,
    'model.attn_logit_softcap': NOT_NEGATIVE, 'model.final_logit_softcap': NOT_NEGATIVE,
    'model.mlp_activation': Choice(('silu', 'gelu_tanh')),
    'model.norm_placement': Choice(('pre', 'sandwich', 'post')),
    'model.qk_norm_scope': Choice(('head', 'all')),
    'model.partial_rotary_factor': Bounds(0, 1, lo_open=True),
    'model.attention_chunk_size': NOT_NEGATIVE,
    'model.wide_mlp_dim': NOT_NEGATIVE, 'model.global_head_dim': NOT_NEGATIVE,
    'model.global_kv_heads': NOT_NEGATIVE, 'model.kv_shared_layers': NOT_NEGATIVE,
    'model.per_layer_input_dim': NOT_NEGATIVE, 'model.per_layer_input_vocab': NOT_NEGATIVE,
    'model.attn_temperature_floor_scale': NOT_NEGATIVE, 'model.attn_temperature_scale': NOT_NEGATIVE,
    'model.linear_attn.n_key_heads': NOT_NEGATIVE, 'model.linear_attn.n_value_heads': NOT_NEGATIVE,
    'model.linear_attn.key_head_dim': NOT_NEGATIVE, 'model.linear_attn.value_head_dim': NOT_NEGATIVE,
    'model.linear_attn.conv_kernel': AT_LEAST_ONE,
    'model.mla.kv_lora_rank': NOT_NEGATIVE, 'model.mla.q_lora_rank': NOT_NEGATIVE,
    'model.mla.qk_nope_head_dim': NOT_NEGATIVE, 'model.mla.qk_rope_head_dim': NOT_NEGATIVE,
    'model.mla.v_head_dim': NOT_NEGATIVE,
    'model.lora.rank': NOT_NEGATIVE, 'model.lora.alpha': POSITIVE, 'model.lora.dropout': FRACTION,
    'model.param_dtype': Choice(DTYPES), 'model.compute_dtype': Choice(DTYPES),
    'model.remat': Choice(('none', 'full', 'dots', 'dots_no_batch')),
    'model.loss_chunk_size': NOT_NEGATIVE,
    'model.attention': Choice(('auto', 'xla', 'cudnn', 'pallas')),
    'model.context_parallel': Choice(('all_gather', 'ring')),
    'data.eval_fraction': FRACTION, 'data.tokenizer_vocab_size': Bounds(16),
    'data.tokenizer_model_type': Choice(('bpe', 'unigram')),
    'data.seq_len': AT_LEAST_ONE, 'data.batch_size': AT_LEAST_ONE, 'data.seed': NOT_NEGATIVE,
    'data.format': Choice(('text', 'alpaca', 'chat', 'preference', 'kto')),
    'data.train_on': Choice(('assistant', 'last', 'all')),
    'data.truncate': Choice(('prompt', 'skip', 'fail')),
    'data.packing': Choice(('auto', 'stream', 'whole', 'none')),
    'data.bad_records': Choice(('fail', 'skip')),
    'data.text_split': Choice(('paragraph', 'line', 'file')),
    'data.eval_max_examples': AT_LEAST_ONE, 'data.prefetch': NOT_NEGATIVE,
    'data.streaming': Choice(('auto', 'true', 'false')), 'data.shuffle_buffer': NOT_NEGATIVE,
    'optimizer.name': Choice(('adamw', 'adafactor', 'lion', 'sgd')), 'optimizer.lr': POSITIVE,
    'optimizer.schedule': Choice(('cosine', 'linear', 'constant')),
    'optimizer.warmup_steps': NOT_NEGATIVE, 'optimizer.end_lr_ratio': Bounds(0, 1),
    'optimizer.weight_decay': NOT_NEGATIVE, 'optimizer.b1': FRACTION, 'optimizer.b2': FRACTION,
    'optimizer.eps': POSITIVE, 'optimizer.grad_clip': NOT_NEGATIVE,
    'train.steps': AT_LEAST_ONE, 'train.microbatches': AT_LEAST_ONE, 'train.seed': NOT_NEGATIVE,
    'train.log_every': AT_LEAST_ONE, 'train.eval_every': AT_LEAST_ONE,
    'train.eval_batches': NOT_NEGATIVE, 'train.checkpoint_every': AT_LEAST_ONE,
    'train.keep_every': NOT_NEGATIVE, 'train.grace_seconds': NOT_NEGATIVE,
    'train.max_bad_steps': AT_LEAST_ONE, 'train.spike_zscore': NOT_NEGATIVE,
    'train.spike_window': AT_LEAST_ONE, 'train.keep_checkpoints': AT_LEAST_ONE,
    'train.tracker_errors': Choice(('fail', 'warn')),
    'train.frozen_dtype': Choice(('param_dtype',) + DTYPES), 'train.offload': Choice(('device', 'host')),
    'train.objective': Choice(('next_token_xent', 'dpo', 'ipo', 'simpo', 'orpo', 'kto', 'distill', 'grpo')),
    'model.quant.type': Choice(('none', 'int8', 'nf4')), 'model.quant.block': AT_LEAST_ONE,
    'model.moe.n_experts': NOT_NEGATIVE, 'model.moe.experts_per_token': AT_LEAST_ONE,
    'model.moe.expert_dim': NOT_NEGATIVE, 'model.moe.capacity_factor': NOT_NEGATIVE,
    'model.moe.implementation': Choice(('ragged', 'dense')),
    'model.moe.aux_loss_weight': NOT_NEGATIVE, 'model.moe.z_loss_weight': NOT_NEGATIVE,
    'model.moe.router': Choice(('softmax', 'sigmoid', 'topk_softmax', 'topk_sigmoid',
                                'scaled_softmax')),
    'model.moe.n_group': AT_LEAST_ONE, 'model.moe.topk_group': AT_LEAST_ONE,
    'model.moe.routed_scaling_factor': POSITIVE, 'model.moe.bias_update_rate': NOT_NEGATIVE,
    'model.moe.shared_dim': NOT_NEGATIVE, 'model.moe.swiglu_limit': NOT_NEGATIVE,
    'model.moe.swiglu_alpha': POSITIVE,
    'train.eval_task_limit': AT_LEAST_ONE, 'train.early_stopping_patience': AT_LEAST_ONE,
    'train.early_stopping_min_delta': NOT_NEGATIVE,
    'preference.simpo_beta': POSITIVE, 'preference.simpo_gamma': NOT_NEGATIVE,
    'preference.orpo_weight': NOT_NEGATIVE, 'preference.kto_desirable_weight': NOT_NEGATIVE,
    'preference.kto_undesirable_weight': NOT_NEGATIVE,
    'distill.loss': Choice(('forward_kl', 'reverse_kl', 'jsd')), 'distill.temperature': POSITIVE,
    'distill.weight': Bounds(0, 1), 'distill.jsd_beta': Bounds(0, 1),
    'grpo.group_size': Bounds(2), 'grpo.updates_per_batch': AT_LEAST_ONE,
    'grpo.max_new_tokens': AT_LEAST_ONE, 'grpo.temperature': POSITIVE, 'grpo.top_k': NOT_NEGATIVE,
    'grpo.top_p': Bounds(0, 1, lo_open=True), 'grpo.clip_low': FRACTION, 'grpo.clip_high': NOT_NEGATIVE,
    'grpo.kl_coef': NOT_NEGATIVE, 'grpo.sampler_devices': NOT_NEGATIVE, 'grpo.loss_type': Choice(('grpo', 'dapo', 'dr_grpo')),
    'grpo.on_error': Choice(('stop', 'skip')), 'grpo.env_timeout_s': NOT_NEGATIVE,
    'grpo.eval_size': NOT_NEGATIVE, 'grpo.eval_every': NOT_NEGATIVE,
    'grpo.importance_level': Choice(('token', 'sequence')), 'grpo.teacher_coef': NOT_NEGATIVE,
    'dpo.beta': POSITIVE, 'dpo.label_smoothing': Bounds(0, 0.5, hi_open=True),
    'mesh.shape.*': Bounds(1, also=(-1,)),
    'distributed.num_processes': AT_LEAST_ONE, 'distributed.process_id': NOT_NEGATIVE,
    'metrics.peak_flops_per_device': NOT_NEGATIVE,
}

# Cross-field rules: (what must hold, check(cfg) -> the one-line problem or None). Run after every
# key passed SCHEMA, so a rule may divide by a count that is known to be >= 1.
RULES = []


def _rule(text: str):
  def register(check):
    RULES.append((text, check))
    return check
  return register


@_rule('`model.n_heads` is a multiple of `model.n_kv_heads`')
def _kv_heads(c):
  if c.model.n_heads % c.model.n_kv_heads:
    return (f'model.n_heads={c.model.n_heads} must be a multiple of model.n_kv_heads='
            f'{c.model.n_kv_heads}; choose n_kv_heads that divides n_heads')


@_rule('`model.d_model` is divisible by `model.n_heads` unless `model.head_dim` is set')
def _head_dim(c):
  if not c.model.head_dim and c.model.d_model % c.model.n_heads:
    return (f'model.d_model={c.model.d_model} is not divisible by model.n_heads={c.model.n_heads}; '
            'set model.head_dim explicitly')


@_rule('`data.seq_len` <= `model.max_seq_len`')
def _seq_len(c):
  if c.data.seq_len > c.model.max_seq_len:
    return (f'data.seq_len={c.data.seq_len} exceeds model.max_seq_len={c.model.max_seq_len}; '
            'shorten the sequence or raise model.max_seq_len')


@_rule('`data.batch_size` is divisible by `train.microbatches`')
def _microbatches(c):
  if c.data.batch_size % c.train.microbatches:
    return (f'data.batch_size={c.data.batch_size} is not divisible by train.microbatches='
            f'{c.train.microbatches}; use a divisor of the batch size')


@_rule('`model.context_parallel` is ring only in models without linear (gated DeltaNet) layers')
def _ring_layers(c):
  if c.model.get('context_parallel') == 'ring' and 'linear' in tuple(c.model.get('layer_types', ())):
    return ("model.context_parallel=ring reorders each sequence's chunks, which the linear "
            "(gated DeltaNet) layers of model.layer_types cannot take; use "
            "model.context_parallel=all_gather")


# The keys each RoPE scaling type needs (lm/model/transformer.py rope_frequencies); others optional.
ROPE_SCALING_KEYS = {'llama3': ('factor', 'low_freq_factor', 'high_freq_factor', 'original_max_seq_len'),
                     'linear': ('factor',), 'yarn': ('factor', 'original_max_seq_len'),
                     'proportional': ('factor', 'partial_rotary_factor')}


@_rule('`model.rope_scaling` is None or a dict whose `type` is ' + ', '.join(ROPE_SCALING_TYPES)
       + ' (default llama3) with that type\'s keys, numbers positive')
def _rope_scaling(c):
  scaling = c.model.rope_scaling
  if scaling is None:
    return None
  kind = scaling.get('type', 'llama3')
  if kind not in ROPE_SCALING_TYPES:
    return (f'model.rope_scaling type {kind!r} is not supported; lm implements '
            f'{", ".join(ROPE_SCALING_TYPES)} (or None for unscaled RoPE)')
  keys = ROPE_SCALING_KEYS[kind]
  numbers = {k: v for k, v in scaling.items() if k not in ('type', 'truncate')}
  if any(k not in scaling for k in keys) or not all(_is_number(v) and v > 0 for v in numbers.values()
                                                      if v is not None):
    return (f'model.rope_scaling={dict(scaling)!r}: type {kind} needs {", ".join(keys)}, each '
            'positive; or None for unscaled RoPE')


@_rule('`model.layer_types`, `model.mlp_types` and `model.rope_layers` are () or name each layer '
       'with a kind lm implements')
def _layer_types(c):
  return layer_problem(c.model)


@_rule('with `model.mla.kv_lora_rank` > 0: an even `model.mla.qk_rope_head_dim` > 0, '
       '`model.mla.v_head_dim` > 0, and no q/k norm, output gate, logit soft-cap, '
       '`query_pre_attn_scalar`, partial RoPE, sinks or query temperature; without it, the other '
       '`model.mla` dims 0')
def _mla(c):
  return mla_problem(c.model)


@_rule('`model.moe.experts_per_token` <= `model.moe.n_experts` when the model has experts')
def _experts_per_token(c):
  moe = c.model.moe
  if moe.n_experts and moe.experts_per_token > moe.n_experts:
    return (f'model.moe.experts_per_token={moe.experts_per_token} exceeds model.moe.n_experts='
            f'{moe.n_experts}; route each token to at most every expert')


@_rule('`model.moe.branch_norms` (Gemma 4) needs a shared expert (`model.moe.shared_dim` > 0) '
       'without `shared_gate`, and `model.norm_placement=sandwich`')
def _branch_norms(c):
  m = c.model
  if not m.moe.n_experts or not m.moe.branch_norms:
    return None
  if not m.moe.shared_dim or m.moe.shared_gate:
    return ('model.moe.branch_norms=True needs the dense branch: set model.moe.shared_dim > 0 '
            'and model.moe.shared_gate=False')
  if m.norm_placement != 'sandwich':
    return (f'model.moe.branch_norms=True needs model.norm_placement=\'sandwich\' (the block\'s '
            f'output norm), not {m.norm_placement!r}')
  return None


@_rule('a group-limited top-k (`model.moe.n_group` > 1) splits the experts evenly and its '
       '`topk_group` groups hold at least `experts_per_token` experts')
def _expert_groups(c):
  moe = c.model.moe
  if not moe.n_experts or moe.n_group == 1 and moe.topk_group == 1:
    return None
  if moe.router != 'sigmoid':
    return (f'model.moe.n_group={moe.n_group} limits only the sigmoid router (DeepSeek-V3, '
            f'GLM-4.5), not model.moe.router={moe.router!r}; set n_group=topk_group=1')
  per_group = moe.n_experts // moe.n_group
  if moe.n_experts % moe.n_group or per_group < 2:
    return (f'model.moe.n_experts={moe.n_experts} does not split into model.moe.n_group='
            f'{moe.n_group} groups of 2 or more experts (a group scores by its best two)')
  if moe.topk_group > moe.n_group or moe.topk_group * per_group < moe.experts_per_token:
    return (f'model.moe.topk_group={moe.topk_group} of {moe.n_group} groups of {per_group} experts '
            f'cannot hold experts_per_token={moe.experts_per_token}')
  return None


@_rule('`model.lora.targets` is a valid regular expression')
def _lora_targets(c):
  try:
    re.compile(c.model.lora.targets)
  except re.error as e:
    return f'model.lora.targets={c.model.lora.targets!r} is not a valid regex ({e})'


@_rule('`mesh.shape` has at most one axis of -1, and every axis `mesh.rules` names exists in it')
def _mesh(c):
  sizes = dict(c.mesh.shape)
  if list(sizes.values()).count(-1) > 1:
    return (f'mesh.shape={sizes}: at most one axis may be -1; give the others fixed sizes')
  for logical, axes in c.mesh.rules:
    for axis in (axes,) if isinstance(axes, str) or axes is None else axes:
      if axis is not None and axis not in sizes:
        return (f'mesh.rules maps {logical!r} to mesh axis {axis!r}, which mesh.shape '
                f'{sorted(sizes)} lacks; name an axis of mesh.shape')


@_rule('`train.resume_changes` names only model, tokenizer, data, objective, partition or all')
def _resume_changes(c):
  parts = [p.strip() for p in c.train.resume_changes.split(',') if p.strip()]
  unknown = [p for p in parts if p not in RESUME_PARTS]
  if unknown:
    return (f'train.resume_changes={c.train.resume_changes!r}: {unknown[0]!r} is not a part of a '
            f'run\'s identity; choose from {", ".join(RESUME_PARTS)}')


RESUME_PARTS = ('model', 'tokenizer', 'data', 'objective', 'partition', 'all')


@_rule('`distributed.process_id` < `distributed.num_processes` when both are set')
def _process_id(c):
  d = c.distributed
  if d.process_id is not None and d.num_processes is not None and d.process_id >= d.num_processes:
    return f'process id {d.process_id} is outside 0..{d.num_processes - 1} (distributed.process_id)'


# Checked where the information exists, listed here so the reference names every rule.
LATER_RULES = (
    'the product of `mesh.shape` equals the device count (checked when the mesh is built, after '
    'multi-host initialisation, before any data is read or step compiled)',
    '`data.batch_size / train.microbatches` is divisible by the data-parallel mesh axes (same)',
    '`train.trainable` names a known partition that selects at least one parameter (same)',
    'the tokenizer has at most `model.vocab_size` tokens (checked once it is loaded or trained)',
    '`optimizer.warmup_steps` beyond `train.steps` is cut to `train.steps - 1`, so a short smoke '
    'run of a long config keeps its shape',
)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_leaf(key: str, value, default, spec) -> str | None:
  """The problem with one key's value, or None: its type against the default's, then its range."""
  nullable = default is None or isinstance(default, config_dict.FieldReference)
  if value is None:
    return None if nullable or spec is None else f'{key}=None is not allowed; {spec.describe()}'
  if isinstance(value, float) and not math.isfinite(value):
    return f'{key}={value!r} is not a finite number'
  if spec is None or (isinstance(spec, Bounds) and not _is_number(value)):
    return None
  problem = spec.problem(value)
  if problem is None:
    return None
  return f'{key}={value!r}; {problem}' if isinstance(spec, Choice) else f'{key}={value!r} {problem}'


def _schema_spec(key: str):
  if key in SCHEMA:
    return SCHEMA[key]
  parent = key.rpartition('.')[0]
  return SCHEMA.get(parent + '.*')


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Every key against SCHEMA (presence, type, range, choice), then the cross-field RULES.
  Raises ConfigError with the first problem."""
  expected = _check_keys(cfg)
  for key, value in dict(_flat_items(cfg)).items():
    if key not in expected and not key.startswith('mesh.shape.'):
      raise ConfigError(f'unknown config key {key!r}' + _nearest(key.rpartition('.')[2], [
          k.rpartition('.')[2] for k in expected if k.rpartition('.')[0] == key.rpartition('.')[0]]))
    problem = _check_leaf(key, value, expected.get(key, -1), _schema_spec(key))
    if problem:
      raise ConfigError(problem)
  for _, check in RULES:
    problem = check(cfg)
    if problem:
      raise ConfigError(problem)
  _VALIDATED[id(cfg)] = (weakref.ref(cfg), _fingerprint(cfg))


def validate_model(cfg: ml_collections.ConfigDict) -> None:
  """The `model.*` keys against SCHEMA and the RULES that name only model keys: what an imported
  Hugging Face or GGUF config must satisfy before a model is built from it (lm generate and eval
  build one without training's data and mesh settings). Raises ConfigError."""
  expected = dict(_flat_items(base_config()))
  for key, value in dict(_flat_items(cfg)).items():
    if key.startswith('model.'):
      problem = _check_leaf(key, value, expected.get(key, -1), _schema_spec(key))
      if problem:
        raise ConfigError(problem)
  for text, check in RULES:
    if all(k.startswith('model.') for k in re.findall(r'`([a-z_.]+)`', text)):
      problem = check(cfg)
      if problem:
        raise ConfigError(problem)


def _check_keys(cfg) -> dict:
  """Raises ConfigError when `cfg` lacks a key of base_config() (a config file that built its own
  partial ConfigDict); returns base_config()'s {key: default}."""
  expected = dict(_flat_items(base_config()))
  saved = dict(_flat_items(cfg))
  missing = [k for k in expected if k not in saved and not k.startswith('mesh.shape.')
             and not k.startswith('model.rope_scaling')]
  if missing:
    raise ConfigError(f'the config lacks {missing[0]}' + (f' and {len(missing) - 1} more keys'
                      if len(missing) > 1 else '') + '; build it from lm.config.base_config() '
                      'and change what differs')
  return expected


_VALIDATED: dict[int, tuple] = {}  # id -> (weak reference, fingerprint) of configs that passed


def _fingerprint(cfg) -> str:
  return repr(sorted(_flat_items(cfg)))


def ensure_valid(cfg: ml_collections.ConfigDict) -> None:
  """validate(cfg), unless this very config already passed it and has not changed since (a config
  from load_config reaches the Trainer validated; one built by hand, or changed, is checked)."""
  seen = _VALIDATED.get(id(cfg))
  if seen is None or seen[0]() is not cfg or seen[1] != _fingerprint(cfg):
    validate(cfg)


# --- Loading -------------------------------------------------------------------------------------

def load_module(path: str, what: str = 'config'):
  """Runs a config file (`configs/*.py`) and returns it as a module. A config is a Python program:
  loading it runs it, so load only configs you trust."""
  if not os.path.isfile(path):
    raise ConfigError(f'{what} file {path!r} not found; pass --config configs/<name>.py')
  module_spec = importlib.util.spec_from_file_location('lm_user_config', path)
  module = importlib.util.module_from_spec(module_spec)
  _run_config_code(path, lambda: module_spec.loader.exec_module(module))
  return module


def _run_config_code(spec: str, call):
  """call(), with whatever a config file's code raises (or exits with) as one ConfigError."""
  try:
    return call()
  except ConfigError:
    raise
  except SystemExit as e:  # else a config calling sys.exit(0) would end the run with success
    raise ConfigError(f'config {spec!r} called sys.exit({e.code!r}) while loading; a config file '
                      'must only define get_config(arg)') from None
  except Exception as e:  # pylint: disable=broad-except
    where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
    first = e.msg if isinstance(e, SyntaxError) else (str(e).splitlines() or [''])[0]
    raise ConfigError(f'config {spec!r} failed to load: {type(e).__name__}{where}: {first}; '
                      'fix the file or its argument') from None


def load_config(spec: str, overrides=(), *, model_preset: str | None = None,
                schema: bool = True) -> ml_collections.ConfigDict:
  """THE config loader for every command, the Python API, the benches and the launchers.

  `spec` is `path/to/config.py[:arg]`; `model_preset` (lm bench --model-preset) replaces the
  model's shape; `overrides` are `{'optimizer.lr': 1e-4}`, `[('optimizer.lr', '1e-4')]` or
  `['--config.optimizer.lr=1e-4']` (strings are parsed as the field's type). Returns the locked
  config, validated against SCHEMA and RULES (`schema=False` for evaluation configs, which hold
  other keys).
  """
  path, _, arg = spec.partition(':')
  module = load_module(path)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config(arg); a config file must define one')
  cfg = _run_config_code(spec, lambda: module.get_config(arg) if arg else module.get_config())
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned {type(cfg).__name__}, not an '
                      'ml_collections.ConfigDict; start from lm.config.base_config()')
  cfg.lock()
  if schema:
    _check_keys(cfg)  # before the overrides, which would name the first missing section
  if model_preset:
    model_config(model_preset)  # a clear error for an unknown name
    cfg.model.update(MODEL_PRESETS[model_preset])
  for key, value in _override_pairs(overrides):
    apply_override(cfg, key, value)
  if schema:
    validate(cfg)
  return cfg


def _override_pairs(overrides):
  if isinstance(overrides, dict):
    return list(overrides.items())
  overrides = list(overrides)
  if overrides and isinstance(overrides[0], str):
    return parse_overrides(overrides)
  return overrides


def _nearest(key: str, options) -> str:
  match = difflib.get_close_matches(key, list(options), n=1)
  return f'; did you mean {match[0]!r}?' if match else f'; valid keys: {sorted(options)}'


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, value) -> None:
  """Sets `cfg.<dotted> = value`; a string `value` is parsed as the field's existing type."""
  dotted = dotted[len('config.'):] if dotted.startswith('config.') else dotted
  *parents, leaf = dotted.split('.')
  node = cfg
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(parents[:i]) or 'config'
      raise ConfigError(f'unknown config key {dotted!r}: {where} has no {part!r}'
                        + _nearest(part, node.keys() if isinstance(node, ml_collections.ConfigDict) else []))
    node = node[part]
  if leaf not in node:
    raise ConfigError(f'unknown config key {dotted!r}' + _nearest(leaf, node.keys()))
  if value is not None and not isinstance(value, str):
    value = 'true' if value is True else 'false' if value is False else repr(value)
  try:
    node[leaf] = None if value is None else _parse_like(node, leaf, value, dotted)
  except TypeError as e:  # ConfigDict's own type check (e.g. a tuple for a number)
    raise ConfigError(f'--config.{dotted}={value!r}: {e}') from None


def _parse_like(node, leaf, text, dotted):
  current = node[leaf]
  field_type = node.get_type(leaf) if hasattr(node, 'get_type') else type(current)
  try:
    if field_type is str:
      return text
    if field_type is bool:
      if text.lower() in ('true', '1', 'yes'):
        return True
      if text.lower() in ('false', '0', 'no'):
        return False
      raise ValueError(text)
    if field_type in (int, float):
      value = ast.literal_eval(text) if text.strip().lower() not in _NON_FINITE else float(text)
      if field_type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
      if field_type is int and not isinstance(value, int):  # 2.5 is refused, never truncated to 2
        raise ValueError(text)
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(text)
      return field_type(value)
    value = ast.literal_eval(text)
    return value
  except (ValueError, SyntaxError, OverflowError):
    name = getattr(field_type, '__name__', str(field_type))
    hint = {bool: '; use true or false', int: '; use a whole number', float: '; use a number'}.get(
        field_type, '; use a Python literal')
    raise ConfigError(f'--config.{dotted}={text!r} is not a valid {name}{hint}') from None


_NON_FINITE = ('nan', 'inf', '-inf', '+inf', 'infinity', '-infinity')


def split_overrides(args) -> tuple[list[tuple[str, str]], list[str]]:
  """(`--config.a.b=value` / `--config.a.b value` pairs, every other argument)."""
  out, rest = [], []
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith('--config.'):
      rest.append(arg)
      i += 1
      continue
    key = arg[len('--config.'):]
    if '=' in key:
      key, value = key.split('=', 1)
    elif i + 1 < len(args):
      i += 1
      value = args[i]
    else:
      raise ConfigError(f'{arg} needs a value: {arg}=VALUE')
    out.append((key, value))
    i += 1
  return out, rest


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
  """Splits `--config.a.b=value` (or `--config.a.b value`) arguments into (key, value) pairs."""
  out, rest = split_overrides(args)
  if rest:
    raise ConfigError(f'unexpected argument {rest[0]!r}; overrides look like --config.optimizer.lr=3e-4')
  return out


def n_experts(m) -> int:
  """model.moe.n_experts; 0 for model configs saved before Mixture-of-Experts existed."""
  moe = m.get('moe')
  return int(moe.n_experts) if moe else 0


def mla_enabled(m) -> bool:
  """Whether attention layers are multi-head latent attention (False for configs saved before it)."""
  mla = m.get('mla')
  return bool(mla and mla.kv_lora_rank)


def mla_problem(m) -> str | None:
  """The one-line problem with model config `m`'s MLA dims, or None."""
  mla = m.get('mla')
  if not mla:
    return None
  if not mla.kv_lora_rank:
    set_dims = [k for k in ('q_lora_rank', 'qk_nope_head_dim', 'qk_rope_head_dim', 'v_head_dim')
                if mla[k]]
    if set_dims:
      return (f'model.mla.{set_dims[0]}={mla[set_dims[0]]} has no effect while '
              'model.mla.kv_lora_rank is 0; set kv_lora_rank for MLA or leave the MLA dims 0')
    return None
  if not mla.qk_rope_head_dim or mla.qk_rope_head_dim % 2:
    return (f'model.mla.qk_rope_head_dim={mla.qk_rope_head_dim}: RoPE rotates pairs of dims, so '
            'MLA needs a positive even number')
  if not mla.v_head_dim:
    return 'model.mla.v_head_dim=0: MLA needs a positive value head dim'
  # What lm's softmax attention has and its MLA does not (DeepSeek uses none of them).
  unsupported = {'qk_norm': bool(m.qk_norm), 'attn_output_gate': bool(m.attn_output_gate),
                 'attn_logit_softcap': bool(m.attn_logit_softcap),
                 'query_pre_attn_scalar': bool(m.query_pre_attn_scalar),
                 'partial_rotary_factor': m.partial_rotary_factor != 1.0,
                 'attn_sinks': bool(m.attn_sinks), 'qk_l2_norm': bool(m.qk_l2_norm),
                 'attn_temperature_floor_scale': bool(m.attn_temperature_floor_scale)}
  field = next((k for k, used in unsupported.items() if used), None)
  if field:
    return (f'model.{field}={m[field]!r} is not implemented with MLA (model.mla.kv_lora_rank > 0); '
            'leave it at its default')
  return None


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads


def reference_markdown() -> str:
  """docs/config_reference.md: every key of base_config() with its default and its comment."""
  import inspect  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  comments, section = {}, 'model'  # by (section, key) and by key: two sections may share a name
  for line in inspect.getsource(base_config).splitlines() + inspect.getsource(model_config).splitlines():
    if s := re.match(r"\s*c\.(\w+) = ", line):
      section = s.group(1)
    elif line.startswith('def model_config'):
      section = 'model'
    m = re.match(r"\s*(\w+)=.*?#\s*(.*)$", line)
    if m:
      comments.setdefault((section, m.group(1)), m.group(2))
      comments.setdefault(m.group(1), m.group(2))
  lines = ['# Configuration reference', '',
           'Generated from `lm/config.py` (its defaults, comments, `SCHEMA` and `RULES`) by '
           '`python -m lm.config > docs/config_reference.md`; a test keeps it in sync. Every key can '
           'be overridden on the command line as `--config.SECTION.KEY=VALUE`. Every command and '
           '`lm.load_config` check each value against the allowed column and the rules below when '
           'the config is loaded, before any data is read, anything compiled or written; a float '
           'must also be finite.', '']
  cfg = base_config()
  for section in cfg.keys():
    lines += [f'## `{section}`', '', '| key | default | allowed | notes |', '|---|---|---|---|']
    for key, value in _flat_items(cfg[section]):
      leaf = key.split('.')[-1]
      note = comments.get((section, leaf), comments.get(leaf, '')).replace('|', '\\|')
      shown = repr(value).replace('|', '\\|')
      spec = _schema_spec(f'{section}.{key}')
      allowed = spec.describe().replace('must be ', '').replace('must not be negative', '>= 0') if spec else ''
      lines.append(f'| `{section}.{key}` | `{shown}` | {allowed} | {note} |')
    lines.append('')
  lines += ['## Rules across keys', '']
  lines += [f'- {text}' for text, _ in RULES]
  lines += [f'- {text}' for text in LATER_RULES]
  lines.append('')
  return '\n'.join(lines)


def _flat_items(node, prefix=''):
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict) and key != 'rope_scaling':  # a dict-valued key
      yield from _flat_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


if __name__ == '__main__':
  print(reference_markdown())
