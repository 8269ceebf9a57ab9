"""Starting weights (`train.init_from`): an lm run directory, a Hugging Face model directory or a
llama.cpp GGUF file (or a directory holding one); and `lm export`.

Fine-tuning is pretraining plus this: the model's shape and tokenizer come from the source, the
source's weights are placed straight into the run's shardings, and whatever the source lacks
(LoRA adapters) is initialised as usual. An lm run trained with LoRA is merged on the way in.
Reading runs is lm/io/runs.py's.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from lm import sharding as sharding_lib
from lm import config as config_lib
from lm.config import with_model_defaults
from lm.data import tokenizer as tokenizer_lib
from lm.errors import CheckpointError, ConfigError, UserError
from lm.io import gguf as gguf_io
from lm.io import hf, output, peft, runs
from lm.model import lora, quant
from lm.model.spec import TEACHER_PREFIX
from lm.train.state import ModelSpec, TrainState

EXPORT_DTYPES = ('float32', 'bfloat16', 'float16')

# The model fields that describe the weights; the rest (dtypes, remat, attention, lora) stay the run's.
ARCH_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
             'max_seq_len', 'rope_theta', 'rope_scaling', 'qkv_bias', 'tie_embeddings', 'norm_eps',
             'norm_offset', 'embed_scale', 'mlp_activation', 'sliding_window', 'layer_types',
             'rope_local_theta', 'attn_out_bias', 'mlp_bias', 'qk_norm', 'norm_placement',
             'query_pre_attn_scalar', 'attn_logit_softcap', 'final_logit_softcap', 'hf_family', 'moe',
             'mla', 'rope_interleaved', 'mlp_types', 'rope_layers', 'partial_rotary_factor',
             'attention_chunk_size', 'attn_output_gate', 'attn_sinks', 'qk_l2_norm', 'qk_norm_scope',
             'attn_temperature_floor_scale', 'attn_temperature_scale', 'linear_attn',
             'attn_k_eq_v', 'global_head_dim', 'global_kv_heads', 'kv_shared_layers', 'layer_scale',
             'per_layer_input_dim', 'per_layer_input_vocab', 'v_norm', 'wide_mlp_dim')
# Of `model.moe`, the fields that describe the weights; the loss weights and kernel stay the run's.
MOE_ARCH_KEYS = ('n_experts', 'experts_per_token', 'expert_dim', 'norm_topk_prob', 'router',
                 'router_bias', 'n_group', 'topk_group', 'routed_scaling_factor', 'shared_dim',
                 'shared_gate', 'expert_bias', 'swiglu_limit', 'swiglu_alpha', 'branch_norms')

kind = runs.kind  # 'lm', 'hf' or 'gguf'


def resolve_config(cfg) -> None:
  """Sets cfg.model's architecture and, if unset, cfg.data.tokenizer from `train.init_from`.
  Idempotent; a no-op without init_from."""
  source = cfg.train.init_from
  if not source:
    return
  source_kind = runs.kind(source)
  try:
    _resolve(cfg, source, source_kind)
    # What a file says is checked as lm's own config is: a negative rope_theta or head counts
    # that do not divide would otherwise build a model that runs and is wrong.
    config_lib.validate_model(cfg)
  except ConfigError as e:
    where = 'its config.json' if source_kind == 'hf' else 'its metadata' if source_kind == 'gguf' else 'its config'
    raise ConfigError(f'{source}: {where} does not describe a valid model ({e}); restore the '
                      'model\'s own config') from None
  except (ValueError, TypeError) as e:  # a value of the wrong type where a number belongs
    raise UserError(f'{source}: its config has a value of the wrong type ({e}); restore the '
                    'model\'s own config') from None


def _resolve(cfg, source: str, source_kind: str) -> None:
  if source_kind == 'gguf':
    file = gguf_io.find_file(source)
    for key, value in gguf_io.model_config(file).items():
      cfg.model[key] = value
    if not cfg.data.tokenizer:  # the vocabulary and chat template embedded in the file
      cfg.data.tokenizer = file
    return
  if source_kind == 'hf':
    fields = hf.model_config_from_hf(hf.read_config(source))
  else:
    fields = {k: v for k, v in runs.run_config(source)['model'].items() if k in ARCH_KEYS}
  for key, value in fields.items():
    if key == 'moe':
      cfg.model.moe.update({k: v for k, v in value.items() if k in MOE_ARCH_KEYS})
    elif key in ('mla', 'linear_attn'):  # every field of these parts describes the weights
      cfg.model[key].update(value)
    else:
      cfg.model[key] = value
  if not cfg.data.tokenizer:
    # A HF tokenizer.json (its folder also holds the chat template) before a SentencePiece model.
    if os.path.isfile(os.path.join(source, 'tokenizer.json')):
      cfg.data.tokenizer = source
    elif os.path.isfile(os.path.join(source, 'tokenizer.model')):
      cfg.data.tokenizer = os.path.join(source, 'tokenizer.model')
    elif source_kind == 'lm' and runs.run_config(source).get('data', {}).get('tokenizer'):
      cfg.data.tokenizer = runs.run_config(source)['data']['tokenizer']  # a run that started from another


def load_params(source: str, spec: ModelSpec, shardings: dict) -> dict:
  """{name: array} of the base weights `spec` needs, from `source` (lm run, HF directory, GGUF);
  in float even for a QLoRA spec (ModelSpec.init quantizes them)."""
  if spec.quantized:
    spec = ModelSpec(quant.without_quant(spec.cfg))
  return runs.load_params(source, spec, shardings)


def init_state(trainer, rng) -> TrainState:
  """The train state with `train.init_from`'s weights; adapters (and any other parameter the
  source lacks) initialised as in pretraining; `ref.*` copies filled from the same weights."""
  loaded = load_params(trainer.cfg.train.init_from, trainer.spec, trainer.shardings.params)
  return trainer.init(rng, loaded)


def teacher_model_config(cfg):
  """The distillation teacher's model config (`distill.teacher`: an lm run or HF directory), with
  the student's dtypes and no adapters. A vocabulary that differs from the student's is a
  ConfigError: logit distillation compares the two distributions token by token."""
  source = cfg.distill.teacher
  if not source:
    raise ConfigError('train.objective=distill needs a teacher: set --config.distill.teacher='
                      'an lm run directory or a Hugging Face model directory')
  if runs.kind(source, 'distill.teacher') == 'hf':
    fields = hf.model_config_from_hf(hf.read_config(source))
  else:
    fields = {k: v for k, v in runs.run_config(source)['model'].items() if k in ARCH_KEYS}
  teacher = lora.without_adapters(ml_collections.ConfigDict(cfg.model.to_dict()))
  for key, value in fields.items():
    teacher[key] = value
  if teacher.vocab_size != cfg.model.vocab_size:
    raise ConfigError(f'distill.teacher={source!r} has a vocabulary of {teacher.vocab_size} tokens '
                      f'but the student has {cfg.model.vocab_size}; the teacher must use the '
                      "student's tokenizer")
  return teacher


def teacher_params(source: str, spec: ModelSpec, shardings: dict) -> dict:
  """{'teacher.<name>': array}: the teacher's weights from `source`, in the state's shardings."""
  teacher_spec = ModelSpec(spec.teacher_cfg)
  own = {n[len(TEACHER_PREFIX):]: s for n, s in shardings.items() if n.startswith(TEACHER_PREFIX)}
  return {TEACHER_PREFIX + n: v for n, v in load_params(source, teacher_spec, own).items()}


def export_run(run_dir: str, out: str, *, adapters_only: bool = False, dtype: str | None = None,
               fmt: str = 'hf') -> str:
  """An lm run's latest weights as a Hugging Face model directory (LoRA adapters merged in), or,
  with `adapters_only`, its adapters as a PEFT directory, or with fmt='gguf' as one llama.cpp GGUF
  file (dtype f16 or q8_0) holding its tokenizer and chat template. Returns a one-line description."""
  if fmt not in ('hf', 'gguf'):
    raise ConfigError(f'--format {fmt}: choose hf or gguf')
  if fmt == 'gguf' and adapters_only:
    raise ConfigError('--adapters-only writes a PEFT directory; GGUF export writes the merged model')
  dtype = dtype or ('f16' if fmt == 'gguf' else 'float32')
  if fmt == 'gguf' and dtype not in gguf_io.EXPORT_DTYPES:
    raise ConfigError(f'--dtype {dtype} is not a GGUF export type; choose '
                      f'{" or ".join(gguf_io.EXPORT_DTYPES)}')
  if fmt == 'hf' and dtype not in EXPORT_DTYPES:  # an integer dtype would round every weight to 0 or +-1
    raise UserError(f'--dtype {dtype}: export writes floating-point weights; choose '
                    f'{", ".join(EXPORT_DTYPES)}')
  if runs.kind(run_dir, '--workdir') != 'lm':
    raise ConfigError(f'{run_dir} is not an lm run directory (no checkpoints/)')
  # Before any weight is read: an output on or in the run, or over other files, is refused.
  kind = 'adapter export' if adapters_only else f'{fmt.upper()} export'
  if fmt == 'gguf':
    target = output.file(out, '--out', [run_dir], kind=kind, replaceable=gguf_io.is_gguf)
  else:
    target = output.directory(out, '--out', [run_dir], kind=kind, writer=jax.process_index() == 0)
  output.check(out, '--out', [run_dir], kind=kind, folder=fmt != 'gguf',
               replaceable=gguf_io.is_gguf if fmt == 'gguf' else None)
  model_cfg = with_model_defaults(quant.without_quant(runs.run_config(run_dir)['model']))  # QLoRA: the unquantized base
  spec = ModelSpec(model_cfg)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, -1, 1), ('data', 'fsdp', 'tensor'))
  rules = (('embed', 'fsdp'), ('vocab', None), ('mlp', None), ('heads', None), ('kv_heads', None))
  shardings = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  base, adapters = runs.base_params(run_dir, spec, shardings, merge=False)
  if adapters_only:
    with target as partial:
      peft.save_peft(partial, adapters, model_cfg, base_model=hf_base(run_dir))
    return f'{len(adapters)} adapter arrays (rank {model_cfg.lora.rank}) -> {out} (PEFT format)'
  if adapters:
    base = lora.merge({**base, **adapters}, model_cfg.lora)
  if fmt == 'gguf':
    with target as partial:
      arch = gguf_io.save(partial, base, lora.without_adapters(model_cfg), _run_tokenizer(run_dir),
                          dtype=dtype, name=os.path.basename(os.path.normpath(run_dir)))
    merged = ' with its LoRA adapters merged' if adapters else ''
    return f'{arch} model{merged} -> {out} (GGUF {dtype.upper()}, tokenizer and chat template embedded)'
  with target as partial:
    hf.save(partial, base, lora.without_adapters(model_cfg), dtype=dtype, **_token_ids(run_dir))
    if jax.process_index() == 0:
      _copy_tokenizer(run_dir, partial)
  merged = ' with its LoRA adapters merged' if adapters else ''
  return f'{hf.family_of(model_cfg)} model{merged} -> {out} (config.json + safetensors)'


def hf_base(run_dir: str) -> str:
  """What a PEFT adapter of this run applies to, for adapter_config.json: the Hugging Face
  directory the run started from (so AutoPeftModelForCausalLM loads it), else the run itself.

  A run started from another lm run trained on that run's weights, not on any HF model's, so
  the chain is not followed: its base is exported with `lm export` first.
  """
  source = runs.run_config(run_dir).get('train', {}).get('init_from')
  if source and os.path.isdir(source) and runs.kind(source) == 'hf':
    return os.path.abspath(source)
  return os.path.abspath(run_dir)


def _copy_tokenizer(run_dir: str, out: str) -> None:
  """The run's tokenizer beside the exported weights: its own tokenizer.model, else the tokenizer
  its config names, copied only once it loads as a tokenizer, and only its tokenizer files."""
  named = runs.tokenizer_file(run_dir)
  if not named:
    return
  runs.run_tokenizer(run_dir)  # a UserError unless it really is a tokenizer
  if named.endswith('.gguf') and os.path.isfile(named):
    _write_gguf_tokenizer(named, out)
    return
  if os.path.isfile(named):
    target = 'tokenizer.json' if named.endswith('.json') else 'tokenizer.model'
    shutil.copyfile(named, os.path.join(out, target))
    return
  for name in ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
               'tokenizer.model'):
    if os.path.isfile(os.path.join(named, name)):
      shutil.copyfile(os.path.join(named, name), os.path.join(out, name))


def _write_gguf_tokenizer(gguf_file: str, out: str) -> None:
  """A GGUF file's embedded vocabulary as Hugging Face tokenizer files: tokenizer.json and a
  tokenizer_config.json with its special tokens and chat template (or a SentencePiece
  tokenizer.model for a 'llama' vocabulary)."""
  tok = tokenizer_lib.load(gguf_file)
  if isinstance(tok, tokenizer_lib.HFTokenizer):
    tok.tok.save(os.path.join(out, 'tokenizer.json'))
    config = {k: v for k, v in tok.config.items() if v is not None}
    config['add_bos_token'] = tok.add_bos  # the GGUF file's setting, which tokenizer.json lacks
  else:
    with open(os.path.join(out, 'tokenizer.model'), 'wb') as f:
      f.write(tok.sp.serialized_model_proto())
    config = {'chat_template': tok.chat_template} if tok.chat_template else {}
  if config:
    with open(os.path.join(out, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)


def _run_tokenizer(run_dir: str):
  """The run's own trained tokenizer, else the one its config names."""
  if not runs.tokenizer_file(run_dir):
    raise CheckpointError(f'{run_dir} has no tokenizer.model and its config names no data.tokenizer; '
                          'a GGUF file must embed one')
  return runs.run_tokenizer(run_dir)


def _token_ids(run_dir: str) -> dict:
  """bos/eos/pad ids for config.json, from the run's tokenizer (lm-trained ones use 2/3/0, not
  Llama's 1/2), or none when the run names no tokenizer."""
  if not runs.tokenizer_file(run_dir):
    return {}
  tok = runs.run_tokenizer(run_dir)
  return {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'pad_token_id': tok.pad_id}
