"""Run identity: what makes a resumed run the same run.

A run directory records, in `identity.json`, the model's shape, a hash of its tokenizer, the data
it reads, the objective and the trainable partition. Resuming with any of these changed would
quietly continue a different run on top of the old checkpoints (a new tokenizer's ids on old
embeddings, another corpus at the old data position), so it is one error naming the difference;
`train.resume_changes` lists the parts that may change deliberately.
"""

from __future__ import annotations

import hashlib
import json
import os

from lm.errors import CheckpointError, read_json
from lm.train import rundir

FILE = 'identity.json'
PARTS = ('model', 'tokenizer', 'data', 'objective', 'partition')

# The model keys that shape the weights (dtypes, remat and attention kernels may change freely).
MODEL_KEYS = ('vocab_size', 'd_model', 'n_layers', 'n_heads', 'n_kv_heads', 'head_dim', 'mlp_dim',
              'max_seq_len', 'rope_theta', 'rope_scaling', 'qkv_bias', 'tie_embeddings', 'norm_eps',
              'norm_offset', 'embed_scale', 'mlp_activation', 'sliding_window')
DATA_KEYS = ('train_files', 'eval_files', 'eval_fraction', 'text_field', 'format', 'fields',
             'chat_template', 'train_on', 'truncate', 'packing', 'text_split', 'mixture', 'seq_len',
             'batch_size', 'seed')
# Recorded only when set away from these defaults, so that runs recorded before the keys existed
# still resume: another shuffle buffer reads another order from a stream's saved position.
DATA_KEYS_IF_SET = {'streaming': 'auto', 'shuffle_buffer': 10_000}


def _plain(value):
  if hasattr(value, 'to_dict'):
    value = value.to_dict()
  return json.loads(json.dumps(value, default=str))  # tuples as lists, as the saved copy has them


def file_hash(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return 'sha256:' + digest.hexdigest()[:16]


def of(cfg, tokenizer) -> dict:
  """{part: value} for this config and tokenizer."""
  m = cfg.model
  return {
      'model': {k: _plain(m[k]) for k in MODEL_KEYS} | {'lora': _plain(m.lora)},
      'tokenizer': file_hash(tokenizer.path) if os.path.isfile(tokenizer.path) else str(tokenizer.path),
      'data': {k: _plain(cfg.data[k]) for k in DATA_KEYS} | {
          k: _plain(cfg.data[k]) for k, default in DATA_KEYS_IF_SET.items()
          if k in cfg.data and cfg.data[k] != default},
      'objective': cfg.train.objective,
      'partition': {'trainable': cfg.train.trainable, 'init_from': cfg.train.init_from},
  }


def _first_difference(saved, current, where: str):
  if isinstance(saved, dict) and isinstance(current, dict):
    for key in sorted(set(saved) | set(current)):
      diff = _first_difference(saved.get(key), current.get(key), f'{where}.{key}')
      if diff:
        return diff
    return None
  return None if saved == current else (where, saved, current)


def check(workdir: str, current: dict, allowed: str) -> None:
  """Raises CheckpointError when the run in `workdir` was trained as something else than
  `current`, except for the parts `allowed` names (train.resume_changes)."""
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    return  # a run from before identities were recorded
  saved = read_json(path, 'run identity', CheckpointError)
  allowed = {p.strip() for p in allowed.split(',') if p.strip()}
  for part in PARTS:
    if part in allowed or 'all' in allowed:
      continue
    diff = _first_difference(saved.get(part), current[part], part)
    if diff:
      where, there, here = diff
      raise CheckpointError(
          f'{workdir} was trained with another {part} ({where}: {there!r} there, {here!r} now); '
          f'resume with the settings it was trained with, use a new --workdir, or set '
          f'--config.train.resume_changes={part} to change it deliberately')


def record(workdir: str, current: dict) -> None:
  rundir.write_text(rundir.inside(workdir, FILE), json.dumps(current, indent=2))
