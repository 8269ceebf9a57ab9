"""llama.cpp GGUF checkpoints in and out, through the `gguf` package.

Import: a GGUF file (or a directory holding exactly one) works wherever a Hugging Face directory
does (`train.init_from`, `lm generate`, `lm eval`). The `{arch}.*` metadata gives the model's
shape; tensors are dequantized on load (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) with
`gguf.dequantize`, one tensor at a time; the embedded tokenizer and chat template are read by
lm/data/gguf_tokenizer.py.

Layouts: GGUF stores a linear weight with ne = [in, out], which numpy reads as [out, in], the
Hugging Face layout, so lm/io/hf.py's reshapes apply once names are mapped. llama.cpp's converter
permutes the q and k rows of Llama-architecture models from HF's rotate-half RoPE to the
interleaved pairs its rope kernel uses (`permute` in convert_hf_to_gguf.py); import undoes it and
export redoes it. Qwen2 files use rotate-half ("NEOX") RoPE and are not permuted.

Export writes F16 or Q8_0 (norms and biases stay F32, as llama.cpp does) with the run's tokenizer
and chat template, to a temporary file renamed into place, so a failed export leaves nothing.
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

ARCHITECTURES = ('llama', 'qwen2', 'qwen3', 'qwen3moe')
# lm's Hugging Face family -> llama.cpp architecture (Mixtral is llama's graph with experts).
ARCH_OF = {'llama': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'mixtral': 'llama',
           'qwen3_moe': 'qwen3moe'}
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
  if 'rope_freqs.weight' in names or _value(reader, f'{arch}.rope.scaling.type', 'none') not in (
      'none', None):
    raise CheckpointError(f'{path}: RoPE scaling (rope_freqs / {arch}.rope.scaling.type) is not '
                          'supported for GGUF import; lm imports GGUF models with plain RoPE')

  def need(key):
    value = _value(reader, f'{arch}.{key}')
    if value is None:
      raise CheckpointError(f'{path}: metadata {arch}.{key} is missing')
    return value

  D, H = int(need('embedding_length')), int(need('attention.head_count'))
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
  embed = names.get('token_embd.weight')
  if embed is None:
    raise CheckpointError(f'{path}: tensor token_embd.weight is missing')
  moe, family = {}, arch
  if 'blk.0.ffn_gate_exps.weight' in names:
    family = 'mixtral' if arch == 'llama' else 'qwen3_moe'
    # Both graphs renormalise the chosen experts' weights (llama.cpp's build_moe_ffn norm_w).
    moe = dict(moe=dict(n_experts=int(need('expert_count')),
                        experts_per_token=int(need('expert_used_count')),
                        expert_dim=int(_value(reader, f'{arch}.expert_feed_forward_length',
                                              need('feed_forward_length'))),
                        norm_topk_prob=True))
  vocab = int(_value(reader, f'{arch}.vocab_size', embed.shape[-1]))
  return dict(
      vocab_size=vocab, d_model=D, n_layers=int(need('block_count')), n_heads=H, n_kv_heads=int(kv),
      head_dim=0 if K == D // H else K, mlp_dim=int(need('feed_forward_length')),
      max_seq_len=int(_value(reader, f'{arch}.context_length', 2048)),
      rope_theta=float(_value(reader, f'{arch}.rope.freq_base', 10000.0)), rope_scaling=None,
      qkv_bias='blk.0.attn_q.bias' in names, tie_embeddings='output.weight' not in names,
      norm_eps=float(need('attention.layer_norm_rms_epsilon')), norm_offset=0.0,
      embed_scale=False, mlp_activation='silu', sliding_window=0,
      attn_out_bias='blk.0.attn_output.bias' in names,
      qk_norm='blk.0.attn_q_norm.weight' in names,
      hf_family={'qwen3moe': 'qwen3_moe'}.get(family, family), **moe)


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
    to_hf = {}
    n_layers = int(_value(reader, f'{self.arch}.block_count', 0))
    for gguf_name, hf_name in NAMES.items():
      for i in range(n_layers) if '{i}' in gguf_name else [None]:
        to_hf[gguf_name.format(i=i)] = hf_name.format(i=i)
    self._tensors, self._experts, self._cached = {}, {}, (None, None)
    family = ('mixtral' if self.arch == 'llama' else 'qwen3_moe'
              if self.arch == 'qwen3moe' else None)
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
    if self.arch == 'llama':
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
  L, E = spec.cfg.n_layers, n_experts(spec.cfg)
  expected, plan = {}, {}
  for name, (template, layout, _) in table.items():
    shape = spec.shapes[name].shape
    stacked = hf.stacked_dims(name, template)
    names = ([template.format(i=i, e=e) for i in range(L) for e in range(E)] if stacked == 2 else
             [template.format(i=i) for i in range(L)] if stacked else [template])
    one = hf.hf_shape(shape[stacked:], layout)
    expected.update({n: (one, name) for n in names})
    plan[name] = (names, stacked, layout)
  hf.check_tensors(reader, expected, path, spec.cfg.tie_embeddings)
  return {name: hf.place(spec.shapes[name].shape, shardings[name],
                         hf.read_stacked(reader, names, spec.shapes[name].shape, layout,
                                         spec.shapes[name].dtype, stacked))
          for name, (names, stacked, layout) in plan.items()}


# ----------------------------------------------------------------------------- export


def save(path: str, params: dict, model_cfg, tokenizer, *, dtype: str = 'f16',
         name: str = 'lm export') -> str:
  """Writes base weights `params` (flat lm names, LoRA already merged) and `tokenizer` as one GGUF
  file at `path`, atomically. Returns the GGUF architecture written."""
  import gguf  # pylint: disable=import-outside-toplevel
  if dtype not in EXPORT_DTYPES:
    raise ConfigError(f'--dtype {dtype} is not a GGUF export type; choose {" or ".join(EXPORT_DTYPES)}')
  family = hf.family_of(model_cfg)
  arch = ARCH_OF.get(family)
  if arch is None or model_cfg.rope_scaling:
    raise CheckpointError(f'GGUF export writes {", ".join(ARCH_OF)} models with plain RoPE '
                          '(others: --format hf, then llama.cpp\'s convert_hf_to_gguf.py); '
                          f'this model is {family}'
                          + (' with RoPE scaling' if model_cfg.rope_scaling else ''))
  m = model_cfg
  E = n_experts(m)
  if E and not m.moe.norm_topk_prob:
    raise CheckpointError('GGUF export: llama.cpp renormalises the chosen experts\' weights '
                          f'(its {arch} graph), but this model has model.moe.norm_topk_prob=false; '
                          'export it with --format hf')
  if E and 'dense' in tuple(m.get('mlp_types') or ()):
    raise CheckpointError('GGUF export writes experts in every layer; this model has dense MLP '
                          'layers among them (model.mlp_types); export it with --format hf')
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
    writer.add_feed_forward_length((m.moe.expert_dim or m.mlp_dim) if family == 'mixtral' else m.mlp_dim)
    if E:
      writer.add_expert_count(E)
      writer.add_expert_used_count(m.moe.experts_per_token)
      if family == 'qwen3_moe':
        writer.add_expert_feed_forward_length(m.moe.expert_dim or m.mlp_dim)
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.n_kv_heads)
    writer.add_rope_freq_base(float(m.rope_theta))
    writer.add_layer_norm_rms_eps(float(m.norm_eps))
    writer.add_rope_dimension_count(K)
    if K != m.d_model // m.n_heads:
      writer.add_key_length(K)
      writer.add_value_length(K)
    writer.add_vocab_size(m.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, token_fields)
    for gguf_name, array in _tensors(params, m, family):
      if qtype == gguf.GGMLQuantizationType.Q8_0 and array.ndim >= 2 and array.shape[-1] % 32 == 0:
        writer.add_tensor(gguf_name, gguf.quantize(array, qtype), raw_dtype=qtype)
      elif array.ndim >= 2:
        writer.add_tensor(gguf_name, array.astype(np.float16))
      else:  # norms and biases stay float32, as llama.cpp writes them
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


def _tensors(params: dict, m, family: str):
  """(GGUF name, float32 numpy array in GGUF's [out, in] order, experts [n_expert, out, in])
  for every base weight."""
  to_gguf = {hf_name: gguf_name for gguf_name, hf_name in {**NAMES, **EXPERT_NAMES.get(family, {})}.items()}
  permuted = ARCH_OF[family] == 'llama'  # llama.cpp's llama graph rotates interleaved pairs
  for lm_name, (template, layout, _) in hf.param_map(params, family, m).items():
    array = np.asarray(hf.host(params[lm_name]), np.float32)
    layers = list(array) if lm_name.startswith('layers.') else [array]
    for i, one in enumerate(layers):
      gguf_name = to_gguf[template].format(i=i)
      if '{e}' in template:  # [E, in, out] -> [E, out, in]: all of the layer's experts, one tensor
        value = np.stack([hf.to_hf(expert, layout) for expert in one])
      else:
        value = hf.to_hf(one, layout)
      if permuted and '.attn_q.' in gguf_name:
        value = permute_rows(value, m.n_heads, inverse=False)
      elif permuted and '.attn_k.' in gguf_name:
        value = permute_rows(value, m.n_kv_heads, inverse=False)
      yield gguf_name, np.ascontiguousarray(value)


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
