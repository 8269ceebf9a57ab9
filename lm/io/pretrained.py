"""Starting weights (`train.init_from`): an lm run directory, a Hugging Face model directory or a
llama.cpp GGUF file (or a directory holding one).

Fine-tuning is pretraining plus this: the model's shape and tokenizer come from the source, the
source's weights are placed straight into the run's shardings, and whatever the source lacks
(LoRA adapters) is initialised as usual. An lm run trained with LoRA is merged on the way in.
"""

from __future__ import annotations

import glob
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm import sharding as sharding_lib
from lm.data import tokenizer as tokenizer_lib
from lm.io import gguf as gguf_io
from lm.io import hf, peft
from lm.model import lora
from lm.config import with_model_defaults
from lm.errors import CheckpointError, ConfigError
from lm.train.partition import REF_PREFIX, is_adapter
from lm.train.state import ModelSpec, TrainState

# The model fields that describe the weights; the rest (dtypes, remat, attention, lora) stay the run's.
ARCH_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
             'max_seq_len', 'rope_theta', 'rope_scaling', 'qkv_bias', 'tie_embeddings', 'norm_eps',
             'norm_offset', 'embed_scale', 'mlp_activation', 'sliding_window', 'layer_types',
             'rope_local_theta', 'attn_out_bias', 'mlp_bias', 'qk_norm', 'post_norms',
             'query_pre_attn_scalar', 'attn_logit_softcap', 'final_logit_softcap', 'hf_family', 'moe')
# Of `model.moe`, the fields that describe the weights; the loss weights and kernel stay the run's.
MOE_ARCH_KEYS = ('n_experts', 'experts_per_token', 'expert_dim', 'norm_topk_prob')


def kind(path: str, what: str = 'train.init_from') -> str:
  """'lm' (a run directory with checkpoints), 'hf' (config.json + *.safetensors) or 'gguf' (a .gguf
  file, or a directory holding one)."""
  if os.path.isfile(path) and path.endswith('.gguf'):
    return 'gguf'
  if not os.path.isdir(path):
    raise ConfigError(f'{what}={path!r} does not exist or is not a directory; name an lm run '
                      'directory, a Hugging Face model directory or a .gguf file')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return 'lm'
  if os.path.isfile(os.path.join(path, 'config.json')) and glob.glob(os.path.join(path, '*.safetensors')):
    return 'hf'
  if gguf_io.find_file(path):
    return 'gguf'
  raise ConfigError(f'{what}={path!r} is neither an lm run directory (with checkpoints/), '
                    'a Hugging Face model directory (config.json + *.safetensors) nor a directory '
                    'holding a .gguf file')


def resolve_config(cfg) -> None:
  """Sets cfg.model's architecture and, if unset, cfg.data.tokenizer from `train.init_from`.
  Idempotent; a no-op without init_from."""
  source = cfg.train.init_from
  if not source:
    return
  source_kind = kind(source)
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
    fields = {k: v for k, v in _run_config(source)['model'].items() if k in ARCH_KEYS}
  for key, value in fields.items():
    if key == 'moe':
      cfg.model.moe.update({k: v for k, v in value.items() if k in MOE_ARCH_KEYS})
    else:
      cfg.model[key] = value
  if not cfg.data.tokenizer:
    # A HF tokenizer.json (its folder also holds the chat template) before a SentencePiece model.
    if os.path.isfile(os.path.join(source, 'tokenizer.json')):
      cfg.data.tokenizer = source
    elif os.path.isfile(os.path.join(source, 'tokenizer.model')):
      cfg.data.tokenizer = os.path.join(source, 'tokenizer.model')


def _run_config(path: str) -> dict:
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has checkpoints/ but no config.json to tell its model shape')
  with open(file, encoding='utf-8') as f:
    return json.load(f)


def _lm_run_params(path: str, spec: ModelSpec, shardings: dict, *, merge: bool = True):
  """The base weights `spec` needs as run `path` last saved them, with its LoRA adapters merged.

  A partial run (LoRA, norms, ...) saves only what it trains; the rest is rebuilt the way that run
  built it: from its own `train.init_from`, or from its seed when it started from scratch.
  """
  directory = os.path.join(os.path.abspath(path), 'checkpoints')  # orbax wants absolute paths
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f'{directory} holds no checkpoint')
  item = os.path.join(directory, str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(item)
  saved = getattr(saved, 'item_metadata', saved)
  saved = getattr(saved, 'tree', saved)['params']
  needed = [n for n in spec.names if not is_adapter(n) and not n.startswith(REF_PREFIX)]
  mesh = next(iter(shardings.values())).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  wanted = [n for n in saved if n in needed or is_adapter(n)]
  target, args = {}, {}
  for n in wanted:
    if n in needed and tuple(saved[n].shape) != tuple(spec.shapes[n].shape):
      raise CheckpointError(f'{item}: parameter {n!r} has shape {tuple(saved[n].shape)}, expected '
                            f'{tuple(spec.shapes[n].shape)}')
    sharding = shardings[n] if n in needed else replicated
    dtype = spec.shapes[n].dtype if n in needed else saved[n].dtype
    target[n] = jax.ShapeDtypeStruct(tuple(saved[n].shape), dtype, sharding=sharding)
    args[n] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
  params = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
      item={'params': target}, restore_args={'params': args}, partial_restore=True))['params']
  missing = [n for n in needed if n not in params]
  run = _run_config(path)
  if missing:  # a partial run: its frozen weights come from where that run got them
    source = run['train'].get('init_from')
    run_spec = ModelSpec(ml_collections.ConfigDict(run['model']))
    if any(n not in run_spec.shapes for n in missing):
      raise CheckpointError(f'{item}: parameter {missing[0]!r} is missing; the run has another model')
    if source:
      base = load_params(source, ModelSpec(lora.without_adapters(spec.cfg)), shardings)
    else:
      init = jax.jit(lambda rng: {n: v for n, v in run_spec.init(rng).items() if n in missing},
                     out_shardings={n: shardings[n] for n in missing})
      base = init(jax.random.key(run['train']['seed']))
    params.update({n: base[n] for n in missing})
  adapters = {n: v for n, v in params.items() if is_adapter(n)}
  if not merge:
    return {n: params[n] for n in needed}, adapters
  if adapters:  # a LoRA run: fold its adapters in, with its own lora settings
    params = lora.merge(params, ml_collections.ConfigDict(run['model']['lora']))
  return {n: params[n] for n in needed}


def load_params(source: str, spec: ModelSpec, shardings: dict) -> dict:
  """{name: array} of the base weights `spec` needs, from `source`, in `shardings`."""
  source_kind = kind(source)
  if source_kind == 'hf':
    return hf.load_params(source, ModelSpec(lora.without_adapters(spec.cfg)), shardings)
  if source_kind == 'gguf':
    return gguf_io.load_params(gguf_io.find_file(source), ModelSpec(lora.without_adapters(spec.cfg)),
                               shardings)
  return _lm_run_params(source, spec, shardings)


def init_state(trainer, rng) -> TrainState:
  """The train state with `train.init_from`'s weights; adapters (and any other parameter the
  source lacks) initialised as in pretraining; `ref.*` copies filled from the same weights."""
  loaded = load_params(trainer.cfg.train.init_from, trainer.spec, trainer.shardings.params)
  return trainer.init(rng, loaded)


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
  if kind(run_dir) != 'lm':
    raise ConfigError(f'{run_dir} is not an lm run directory (no checkpoints/)')
  model_cfg = with_model_defaults(_run_config(run_dir)['model'])
  spec = ModelSpec(model_cfg)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, -1, 1), ('data', 'fsdp', 'tensor'))
  rules = (('embed', 'fsdp'), ('vocab', None), ('mlp', None), ('heads', None), ('kv_heads', None))
  shardings = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  base, adapters = _lm_run_params(run_dir, spec, shardings, merge=False)
  if adapters_only:
    peft.save_peft(out, adapters, model_cfg, base_model=hf_base(run_dir))
    return f'{len(adapters)} adapter arrays (rank {model_cfg.lora.rank}) -> {out} (PEFT format)'
  if adapters:
    base = lora.merge({**base, **adapters}, model_cfg.lora)
  if fmt == 'gguf':
    arch = gguf_io.save(out, base, lora.without_adapters(model_cfg), _run_tokenizer(run_dir),
                        dtype=dtype, name=os.path.basename(os.path.normpath(run_dir)))
    merged = ' with its LoRA adapters merged' if adapters else ''
    return f'{arch} model{merged} -> {out} (GGUF {dtype.upper()}, tokenizer and chat template embedded)'
  hf.save(out, base, lora.without_adapters(model_cfg), dtype=dtype, **_token_ids(run_dir))
  if jax.process_index() == 0:
    _copy_tokenizer(run_dir, out)
  merged = ' with its LoRA adapters merged' if adapters else ''
  return f'{hf.family_of(model_cfg)} model{merged} -> {out} (config.json + safetensors)'


def hf_base(run_dir: str) -> str:
  """What a PEFT adapter of this run applies to, for adapter_config.json: the Hugging Face
  directory the run started from (so AutoPeftModelForCausalLM loads it), else the run itself.

  A run started from another lm run trained on that run's weights, not on any HF model's, so
  the chain is not followed: its base is exported with `lm export` first.
  """
  source = _run_config(run_dir).get('train', {}).get('init_from')
  if source and os.path.isdir(source) and kind(source) == 'hf':
    return os.path.abspath(source)
  return os.path.abspath(run_dir)


def _copy_tokenizer(run_dir: str, out: str) -> None:
  """The run's tokenizer beside the exported weights: its own tokenizer.model, or the one its
  config named (a SentencePiece file, or a HF tokenizer folder's files)."""
  own = os.path.join(run_dir, 'tokenizer.model')
  named = _run_config(run_dir).get('data', {}).get('tokenizer') or ''
  if os.path.isfile(own):
    shutil.copyfile(own, os.path.join(out, 'tokenizer.model'))
  elif named.endswith('.gguf') and os.path.isfile(named):
    _write_gguf_tokenizer(named, out)
  elif os.path.isfile(named):
    target = 'tokenizer.json' if named.endswith('.json') else 'tokenizer.model'
    shutil.copyfile(named, os.path.join(out, target))
  elif os.path.isdir(named):
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
  else:
    with open(os.path.join(out, 'tokenizer.model'), 'wb') as f:
      f.write(tok.sp.serialized_model_proto())
    config = {'chat_template': tok.chat_template} if tok.chat_template else {}
  if config:
    with open(os.path.join(out, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
      json.dump(config, f, indent=2)


def _run_tokenizer(run_dir: str):
  """The run's own trained tokenizer, else the one its config names."""
  own = os.path.join(run_dir, 'tokenizer.model')
  named = _run_config(run_dir).get('data', {}).get('tokenizer')
  if not os.path.isfile(own) and not named:
    raise CheckpointError(f'{run_dir} has no tokenizer.model and its config names no data.tokenizer; '
                          'a GGUF file must embed one')
  return tokenizer_lib.load(own if os.path.isfile(own) else named)


def _token_ids(run_dir: str) -> dict:
  """bos/eos/pad ids for config.json, from the run's tokenizer (lm-trained ones use 2/3/0, not
  Llama's 1/2), or none when it cannot be read."""
  own = os.path.join(run_dir, 'tokenizer.model')
  path = own if os.path.isfile(own) else _run_config(run_dir).get('data', {}).get('tokenizer')
  try:
    tok = tokenizer_lib.load(path)
  except Exception:  # pylint: disable=broad-except
    return {}
  return {'bos_token_id': tok.bos_id, 'eos_token_id': tok.eos_id, 'pad_token_id': tok.pad_id}
