"""Starting weights (`train.init_from`): an lm run directory or a Hugging Face model directory.

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

from lm import hf, lora
from lm.checkpoint import Checkpointer
from lm.errors import CheckpointError, ConfigError
from lm.partition import REF_PREFIX, is_adapter
from lm.state import ModelSpec, TrainState, new_train_state

# The model fields that describe the weights; the rest (dtypes, remat, attention, lora) stay the run's.
ARCH_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
             'max_seq_len', 'rope_theta', 'rope_scaling', 'qkv_bias', 'tie_embeddings', 'norm_eps',
             'norm_offset', 'embed_scale', 'mlp_activation', 'sliding_window')


def kind(path: str, what: str = 'train.init_from') -> str:
  """'lm' (a run directory with checkpoints) or 'hf' (config.json + *.safetensors)."""
  if not os.path.isdir(path):
    raise ConfigError(f'{what}={path!r} does not exist or is not a directory; name an lm run '
                      'directory or a Hugging Face model directory')
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return 'lm'
  if os.path.isfile(os.path.join(path, 'config.json')) and glob.glob(os.path.join(path, '*.safetensors')):
    return 'hf'
  raise ConfigError(f'{what}={path!r} is neither an lm run directory (with checkpoints/) '
                    'nor a Hugging Face model directory (config.json + *.safetensors)')


def _run_model_config(path: str) -> dict:
  file = os.path.join(path, 'config.json')
  if not os.path.isfile(file):
    raise CheckpointError(f'{path} has checkpoints/ but no config.json to tell its model shape')
  with open(file, encoding='utf-8') as f:
    return json.load(f)['model']


def resolve_config(cfg) -> None:
  """Sets cfg.model's architecture and, if unset, cfg.data.tokenizer from `train.init_from`.
  Idempotent; a no-op without init_from."""
  source = cfg.train.init_from
  if not source:
    return
  if kind(source) == 'hf':
    fields = hf.model_config_from_hf(hf.read_config(source))
  else:
    fields = {k: v for k, v in _run_model_config(source).items() if k in ARCH_KEYS}
  for key, value in fields.items():
    cfg.model[key] = value
  if not cfg.data.tokenizer:
    # A HF tokenizer.json (its folder also holds the chat template) before a SentencePiece model.
    if os.path.isfile(os.path.join(source, 'tokenizer.json')):
      cfg.data.tokenizer = source
    elif os.path.isfile(os.path.join(source, 'tokenizer.model')):
      cfg.data.tokenizer = os.path.join(source, 'tokenizer.model')


def _restore_lm_params(path: str, names: list, spec_shapes: dict, shardings: dict) -> tuple[dict, dict]:
  """The latest checkpoint's params of run `path`: (base weights, adapters), only the base names
  this model has (plus every adapter, for merging)."""
  directory = os.path.join(os.path.abspath(path), 'checkpoints')  # orbax reads absolute paths only
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f'{directory} holds no checkpoint')
  item = os.path.join(directory, str(step), 'state')
  checkpointer = ocp.PyTreeCheckpointer()
  saved = checkpointer.metadata(item)
  saved = getattr(saved, 'item_metadata', saved)
  saved = getattr(saved, 'tree', saved)['params']
  wanted = {n for n in saved if (n in names and not is_adapter(n)) or is_adapter(n)}
  missing = [n for n in names if not is_adapter(n) and n not in saved]
  meta = Checkpointer(path, read_only=True).read_meta(step)
  frozen = _frozen_base(path, meta, missing, shardings) if missing and meta['params'] == 'trainable' else {}
  missing = [n for n in missing if n not in frozen]
  if missing:
    raise CheckpointError(f'{item}: parameter {missing[0]!r} is missing; the run has another model')
  target, args = {}, {}
  mesh = next(iter(shardings.values())).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for n in wanted:
    if n in spec_shapes and tuple(saved[n].shape) != tuple(spec_shapes[n].shape):
      raise CheckpointError(f'{item}: parameter {n!r} has shape {tuple(saved[n].shape)}, expected '
                            f'{tuple(spec_shapes[n].shape)}')
    sharding = shardings.get(n, replicated) if not is_adapter(n) else replicated
    dtype = spec_shapes[n].dtype if n in spec_shapes and not is_adapter(n) else saved[n].dtype
    target[n] = jax.ShapeDtypeStruct(tuple(saved[n].shape), dtype, sharding=sharding)
    args[n] = ocp.ArrayRestoreArgs(sharding=sharding, dtype=dtype)
  restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
      item={'params': target}, restore_args={'params': args}, partial_restore=True))['params']
  manager.close()
  base = {**frozen, **{n: v for n, v in restored.items() if not is_adapter(n)}}
  return base, {n: v for n, v in restored.items() if is_adapter(n)}


def _frozen_base(path: str, meta: dict, names: list, shardings: dict) -> dict:
  """Parameters `names` that a partial run (LoRA, ...) did not save because they were frozen,
  rebuilt from the base its checkpoint names: its own train.init_from, else its initialisation."""
  run_model = ml_collections.ConfigDict(_run_model_config(path))
  mesh = next(iter(shardings.values())).mesh
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  base = meta.get('base') or {}
  if base.get('init_from'):
    base_spec = ModelSpec(lora.without_adapters(run_model))
    loaded = load_params(base['init_from'], base_spec,
                         {n: shardings.get(n, replicated) for n in base_spec.names})
    return {n: loaded[n] for n in names if n in loaded}
  spec = ModelSpec(run_model)

  def init():
    params = spec.init(jax.random.key(base.get('seed', 0)))  # as the run's Trainer.init_state
    return {n: params[n] for n in names}

  return jax.jit(init, out_shardings={n: shardings.get(n, replicated) for n in names})()


def load_params(source: str, spec: ModelSpec, shardings: dict) -> dict:
  """{name: array} of the base weights `spec` needs, from `source`, in `shardings`."""
  if kind(source) == 'hf':
    base_spec = ModelSpec(lora.without_adapters(spec.cfg))
    return hf.load_params(source, base_spec, shardings)
  base_names = [n for n in spec.names if not is_adapter(n) and not n.startswith(REF_PREFIX)]
  base, adapters = _restore_lm_params(source, base_names, spec.shapes, shardings)
  if adapters:  # a LoRA run: fold its adapters in, with its own lora settings
    run_lora = ml_collections.ConfigDict(_run_model_config(source)['lora'])
    base = lora.merge({**base, **adapters}, run_lora)
  return base


def init_state(trainer, rng) -> TrainState:
  """The train state with `train.init_from`'s weights; adapters (and any other parameter the
  source lacks) initialised as in pretraining; `ref.*` copies filled from the same weights."""
  spec, tx = trainer.spec, trainer.tx
  loaded = load_params(trainer.cfg.train.init_from, spec, trainer.shardings.params)

  def init(rng, loaded):
    params = spec.init(rng)  # XLA drops the random draws that `loaded` replaces
    params.update(loaded)
    params.update({REF_PREFIX + n: v for n, v in loaded.items() if REF_PREFIX + n in params})
    return new_train_state(params, tx, trainer.cfg.train.spike_window)

  loaded_shardings = {n: trainer.shardings.params[n] for n in loaded}
  return jax.jit(init, in_shardings=(None, loaded_shardings), out_shardings=trainer.shardings,
                 donate_argnums=1)(rng, loaded)


def export_run(run_dir: str, out: str, *, adapters_only: bool = False, dtype: str = 'float32') -> str:
  """An lm run's latest weights as a Hugging Face model directory (LoRA adapters merged in), or,
  with `adapters_only`, its adapters as a PEFT directory. Returns a one-line description."""
  from lm import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  if kind(run_dir, what='--workdir') != 'lm':
    raise ConfigError(f'--workdir {run_dir} is a Hugging Face directory, not an lm run directory '
                      '(no checkpoints/)')
  model_cfg = ml_collections.ConfigDict(_run_model_config(run_dir))
  spec = ModelSpec(model_cfg)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()).reshape(1, -1, 1), ('data', 'fsdp', 'tensor'))
  rules = (('embed', 'fsdp'), ('vocab', None), ('mlp', None), ('heads', None), ('kv_heads', None))
  shardings = sharding_lib.param_shardings(spec.logical_axes, spec.shapes, mesh, rules)
  base_names = [n for n in spec.names if not is_adapter(n)]
  base, adapters = _restore_lm_params(run_dir, base_names, spec.shapes, shardings)
  if adapters_only:
    lora.save_peft(out, adapters, model_cfg, base_model=os.path.abspath(run_dir))
    return f'{len(adapters)} adapter arrays (rank {model_cfg.lora.rank}) -> {out} (PEFT format)'
  if adapters:
    base = lora.merge({**base, **adapters}, model_cfg.lora)
  hf.save(out, base, lora.without_adapters(model_cfg), dtype=dtype)
  tokenizer = os.path.join(run_dir, 'tokenizer.model')
  if os.path.isfile(tokenizer) and jax.process_index() == 0:
    shutil.copyfile(tokenizer, os.path.join(out, 'tokenizer.model'))
  merged = ' with its LoRA adapters merged' if adapters else ''
  return f'{hf.family_of(model_cfg)} model{merged} -> {out} (config.json + safetensors)'
