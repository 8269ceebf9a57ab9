"""What the Hugging Face families share: RoPE parameters both ways, the Llama tensor layout, and
the Family record a family module fills in.

Tensor tables map each lm parameter to (HF tensor name with {i} for the model layer and {e} for
the expert, layout, part): layout n > 0 for a kernel [*in (n dims), *out] stored as [prod(out),
prod(in)], 0 for the same array, FLAT for a [H, K] bias stored as [H * K]; part None, or (index,
names[, groups]) when the HF tensor is the row-wise concatenation of the lm parameters `names`
(Phi-3's fused qkv_proj) or, with `groups`, of those parameters interleaved in `groups` equal
row blocks (Qwen3-Next's q_proj holds each head's query and gate one after the other).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from lm.config import ROPE_SCALING_TYPES
from lm.errors import ConfigError

ROPE_TYPES = ('default',) + ROPE_SCALING_TYPES
LAYER_TYPES = {'sliding_attention': 'sliding', 'full_attention': 'full',
               'chunked_attention': 'chunked', 'linear_attention': 'linear'}
FLAT = -1  # a [H, K] bias stored flat [H * K]
LAYER = 'model.layers.{i}.'

# lm module -> HF module ({i}: layer index). Parameters and LoRA adapters hang off these.
MODULES = {
    'layers.attn.q': LAYER + 'self_attn.q_proj',
    'layers.attn.k': LAYER + 'self_attn.k_proj',
    'layers.attn.v': LAYER + 'self_attn.v_proj',
    'layers.attn.o': LAYER + 'self_attn.o_proj',
    'layers.mlp.gate': LAYER + 'mlp.gate_proj',
    'layers.mlp.up': LAYER + 'mlp.up_proj',
    'layers.mlp.down': LAYER + 'mlp.down_proj',
    'lm_head': 'lm_head',
}
IN_DIMS = {'layers.attn.o': 2}  # kernel dims that are inputs (o contracts heads and head_dim)


@dataclasses.dataclass(frozen=True)
class Custom:
  """One HF tensor per layer holding several lm parameters in a layout no plain table entry
  expresses (a projection interleaved per head, a convolution's channels): exact numpy functions
  both ways, applied per layer. In a tensor table its key is the tuple `names`."""
  template: str  # HF tensor name with {i}
  names: tuple  # the lm parameters, stacked over the same layers
  to_lm: Callable  # HF array -> a tuple of one layer's lm arrays, in `names` order
  to_hf: Callable  # one layer's lm arrays, in `names` order -> the HF array


@dataclasses.dataclass(frozen=True)
class Family:
  """One Hugging Face architecture: how its config and tensors map to lm's parts."""
  model_type: str
  architecture: str
  to_lm: Callable[[dict], dict]  # config.json -> lm model fields
  to_hf: Callable[[Any], dict]  # lm model config -> config.json
  tensors: Callable[[Any, dict], dict]  # (lm model config, parameter shapes) -> tensor table
  unfit: Callable[[Any], str | None]  # the first lm model field this family cannot express
  # lm modules beyond MODULES -> HF module (DeepSeek's q_a, kv_b, ...): PEFT's names for them.
  modules: dict = dataclasses.field(default_factory=dict)
  # (lm model config) -> a regex of checkpoint tensors transformers skips on load; None: none
  ignored: Callable[[Any], str] | None = None
  # The transformers module ({i}: layer) holding a layer's experts as two 3-D parameters,
  # gate_up_proj [E, 2F, D] (gate rows, then up) and down_proj [E, D, F], which PEFT adapts as
  # target_parameters (lm/io/peft.py); '' where lm writes no PEFT expert adapters.
  experts: str = ''


def llama_tensors(shapes: dict, *, norms: dict | None = None, modules: dict | None = None) -> dict:
  """The Llama tensor table for the parameters in `shapes`: embeddings, the final norm, the layer
  norms (`norms`: lm norm -> HF module, defaults Llama's), attention, MLP and their biases."""
  norms = norms or {'attn_norm': LAYER + 'input_layernorm',
                    'mlp_norm': LAYER + 'post_attention_layernorm'}
  out = {'embed': ('model.embed_tokens.weight', 0, None),
         'final_norm.scale': ('model.norm.weight', 0, None),
         'layers.attn.q_norm.scale': (LAYER + 'self_attn.q_norm.weight', 0, None),
         'layers.attn.k_norm.scale': (LAYER + 'self_attn.k_norm.weight', 0, None)}
  out.update({f'layers.{n}.scale': (hf + '.weight', 0, None) for n, hf in norms.items()})
  for module, hf_module in {**MODULES, **(modules or {})}.items():
    out[module + '.kernel'] = (hf_module + '.weight', IN_DIMS.get(module, 1), None)
    out[module + '.bias'] = (hf_module + '.bias', FLAT, None)
  return {k: v for k, v in out.items() if k in shapes}


def require_silu(hf: dict, architecture: str) -> None:
  """One line for a checkpoint whose MLP activation is not SwiGLU's silu."""
  activation = hf.get('hidden_act', 'silu')
  if activation != 'silu':
    raise ConfigError(f'{architecture} with hidden_act={activation!r} is not supported; lm '
                      'implements silu')


def llama_fields(hf: dict) -> dict:
  """The lm model fields every decoder family sets the way Llama does."""
  D, H = hf['hidden_size'], hf['num_attention_heads']
  K = hf.get('head_dim') or D // H
  return dict(vocab_size=hf['vocab_size'], d_model=D, n_layers=hf['num_hidden_layers'], n_heads=H,
              n_kv_heads=hf.get('num_key_value_heads') or H, head_dim=0 if K == D // H else K,
              mlp_dim=hf['intermediate_size'],
              max_seq_len=hf.get('max_position_embeddings', 2048),
              tie_embeddings=bool(hf.get('tie_word_embeddings', False)),
              norm_eps=float(hf.get('rms_norm_eps', 1e-6)))


def llama_hf_config(m, family: str, architecture: str) -> dict:
  """The config.json fields every decoder family writes the way Llama does."""
  from lm.config import head_dim  # pylint: disable=import-outside-toplevel
  out = dict(architectures=[architecture], model_type=family, vocab_size=m.vocab_size,
             hidden_size=m.d_model, intermediate_size=m.mlp_dim, num_hidden_layers=m.n_layers,
             num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=head_dim(m),
             max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps,
             tie_word_embeddings=bool(m.tie_embeddings), hidden_act='silu', attention_dropout=0.0,
             # A family's default ids fit only its own vocabulary; export passes the run's own.
             pad_token_id=None, bos_token_id=None, eos_token_id=None)
  rope = {'rope_type': 'default', 'rope_theta': m.rope_theta}
  if m.rope_scaling:
    rope.update(hf_rope_scaling(m.rope_scaling))
  out['rope_parameters'] = rope
  return out


def layer_types_from_hf(hf: dict) -> tuple:
  """config.json's layer_types in lm's names; one line naming an unknown type."""
  types = tuple(hf.get('layer_types') or ())
  unknown = sorted(set(types) - set(LAYER_TYPES))
  if unknown:
    raise ConfigError(f'layer type {unknown[0]!r} is not supported; lm implements '
                      f'{", ".join(LAYER_TYPES)}')
  return tuple(LAYER_TYPES[t] for t in types)


def layer_types_to_hf(m) -> list:
  names = {kind: hf_name for hf_name, kind in LAYER_TYPES.items()}
  kinds = tuple(m.layer_types) or ('sliding' if m.sliding_window else 'full',) * m.n_layers
  return [names[k] for k in kinds]


def rope_from_hf(params: dict, hf: dict) -> tuple[float, dict | None]:
  """(theta, lm rope_scaling) from one HF RoPE parameter dict, with transformers' defaults."""
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind not in ROPE_TYPES:
    raise ConfigError(f'rope type {kind!r} is not supported; lm implements {", ".join(ROPE_TYPES)}')
  if kind == 'default':
    return float(theta), None
  # transformers reads these from the config itself when the RoPE dict lacks them (Phi-3 keeps
  # original_max_position_embeddings outside it).
  old_len = int(hf.get('original_max_position_embeddings') or params.get(
      'original_max_position_embeddings') or hf.get('max_position_embeddings', 2048))
  if kind == 'linear':
    return float(theta), dict(type='linear', factor=float(params['factor']))
  if kind == 'llama3':
    return float(theta), dict(type='llama3', factor=float(params['factor']),
                              low_freq_factor=float(params['low_freq_factor']),
                              high_freq_factor=float(params['high_freq_factor']),
                              original_max_seq_len=old_len)
  if kind == 'proportional':  # Gemma 4's full layers
    return float(theta), dict(type='proportional', factor=float(params.get('factor', 1.0)),
                              partial_rotary_factor=float(params.get('partial_rotary_factor', 1.0)))
  factor = params.get('factor') or hf.get('max_position_embeddings', 2048) / old_len
  yarn = dict(type='yarn', factor=float(factor), original_max_seq_len=old_len,
              beta_fast=float(params.get('beta_fast') or 32),
              beta_slow=float(params.get('beta_slow') or 1),
              truncate=bool(params.get('truncate', True)))
  yarn.update({k: float(params[k]) for k in ('attention_factor', 'mscale', 'mscale_all_dim')
               if params.get(k) is not None})
  return float(theta), yarn


def rope_params(hf: dict) -> tuple[dict, dict]:
  """(full layers' RoPE dict, sliding layers' RoPE dict or {}) in any transformers format."""
  params = dict(hf.get('rope_parameters') or {})
  if 'full_attention' in params or 'sliding_attention' in params:  # per layer type (Gemma 3)
    return dict(params.get('full_attention') or {}), dict(params.get('sliding_attention') or {})
  params = {**(hf.get('rope_scaling') or {}), **params}
  local = {'rope_theta': hf['rope_local_base_freq']} if 'rope_local_base_freq' in hf else {}
  return params, local


def hf_rope_scaling(s) -> dict:
  """lm model.rope_scaling -> transformers' RoPE parameter dict."""
  if s.get('type', 'llama3') == 'linear':
    return dict(rope_type='linear', factor=s['factor'])
  if s.get('type', 'llama3') == 'proportional':
    factor = {'factor': s['factor']} if s['factor'] != 1.0 else {}  # transformers' default 1
    return dict(rope_type='proportional', partial_rotary_factor=s['partial_rotary_factor'], **factor)
  if s.get('type', 'llama3') == 'llama3':
    return dict(rope_type='llama3', factor=s['factor'], low_freq_factor=s['low_freq_factor'],
                high_freq_factor=s['high_freq_factor'],
                original_max_position_embeddings=s['original_max_seq_len'])
  out = dict(rope_type='yarn', factor=s['factor'],
             original_max_position_embeddings=s['original_max_seq_len'],
             beta_fast=s.get('beta_fast', 32.0), beta_slow=s.get('beta_slow', 1.0),
             truncate=s.get('truncate', True))
  out.update({k: s[k] for k in ('attention_factor', 'mscale', 'mscale_all_dim') if k in s})
  return out


