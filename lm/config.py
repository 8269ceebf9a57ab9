"""Run configuration: defaults, model presets, loading `configs/*.py` files and applying overrides.

Configs follow the big_vision convention: a Python file with `get_config(arg)` returning an
`ml_collections.ConfigDict`. Every config starts from `base_config()` so that every key a run can
set exists here, with its default, and a locked config rejects anything else.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

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
}


ROPE_SCALING_TYPES = ('llama3', 'linear', 'yarn')  # model.rope_scaling['type'] (lm/model/transformer.py)


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
      layer_types=(),  # per layer 'sliding' | 'full' (Gemma 2/3): only sliding layers use sliding_window; (): all alike
      rope_local_theta=0.0,  # RoPE base of 'sliding' layers, unscaled (Gemma 3); 0: as full layers
      attn_out_bias=False,  # a bias on the attention output projection (Llama attention_bias)
      mlp_bias=False,  # biases on gate/up/down (Llama mlp_bias)
      qk_norm=False,  # RMSNorm over head_dim on queries and keys before RoPE (Qwen3, Qwen3-MoE, Gemma 3)
      post_norms=False,  # also norm the attention and MLP outputs before the residual add (Gemma 2/3)
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
          aux_loss_weight=0.01,  # load-balancing loss weight in the objective (HF router_aux_loss_coef)
          z_loss_weight=0.001,  # router z-loss weight (ST-MoE)
      )),
      # LoRA adapters on the linear layers whose names match `targets` (docs/finetuning.md).
      lora=ml_collections.ConfigDict(dict(
          rank=0,  # 0: no adapters
          alpha=16.0,  # scale = alpha / rank (alpha / sqrt(rank) with rslora)
          dropout=0.0,  # dropout on the adapter's input, in training only
          rslora=False,  # rank-stabilised scaling alpha / sqrt(rank)
          targets=r'layers\.(attn|mlp)\.',  # regex searched in layers.attn.{q,k,v,o}, layers.mlp.{gate,up,down}, lm_head
      )),
      param_dtype='float32',
      compute_dtype='float32',
      remat='none',  # none | full | dots | dots_no_batch
      scan_layers=True,  # lax.scan over stacked layers: compile time independent of depth
      attention='auto',  # auto | xla | cudnn | pallas (docs/attention.md)
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
      format='text',  # text | alpaca | chat | preference
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
      eval_every=200,
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
      objective='next_token_xent',  # next_token_xent | dpo (lm/train/objectives.py)
      init_from=config_dict.placeholder(str),  # start from an lm run dir or a HF model dir; sets model shape and tokenizer
      eval_tasks='',  # lm/eval/tasks.py names, comma-separated, run at every evaluation; logged as task/metric
      eval_task_limit=50,  # examples per task at each evaluation
      early_stopping_metric='',  # '' never stops; else e.g. eval_loss or gsm8k_nll/answer_perplexity
      early_stopping_patience=3,  # evaluations without improvement before stopping
      early_stopping_min_delta=0.0,  # smallest change that counts as an improvement
  ))

  c.dpo = ml_collections.ConfigDict(dict(
      beta=0.1,  # strength of the pull towards the reference policy
      label_smoothing=0.0,  # conservative DPO: assumed share of flipped preference labels
  ))

  c.mesh = ml_collections.ConfigDict(dict(
      # Axis sizes; one -1 takes the remaining devices.
      shape=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1)),
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
      # (lm/train/flops.py) or, on CPU, a short measured matmul rate.
      peak_flops_per_device=0.0,
      tensorboard=True,
  ))
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]` and returns its locked ConfigDict."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} not found; pass --config configs/<name>.py')
  # A config is a Python program: loading it runs it, so load only configs you trust.
  module_spec = importlib.util.spec_from_file_location('lm_user_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, 'get_config'):
      raise ConfigError(f'{path} defines no get_config(arg); a config file must define one')
    cfg = module.get_config(arg) if arg else module.get_config()
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    where = f' (line {e.lineno})' if isinstance(e, SyntaxError) else ''
    first = e.msg if isinstance(e, SyntaxError) else (str(e).splitlines() or [''])[0]
    raise ConfigError(f'config {spec!r} failed to load: {type(e).__name__}{where}: {first}; '
                      'fix the file or its argument') from None
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned {type(cfg).__name__}, not an '
                      'ml_collections.ConfigDict; start from lm.config.base_config()')
  cfg.lock()
  return cfg


def _nearest(key: str, options) -> str:
  match = difflib.get_close_matches(key, list(options), n=1)
  return f'; did you mean {match[0]!r}?' if match else f'; valid keys: {sorted(options)}'


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, value: str) -> None:
  """Sets `cfg.<dotted> = value`, parsing `value` as the field's existing type."""
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
  node[leaf] = _parse_like(node, leaf, value, dotted)


def _parse_like(node, leaf, text, dotted):
  import ast
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
      value = ast.literal_eval(text)
      if field_type is int and isinstance(value, float) and value.is_integer():
        value = int(value)
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(text)
      return field_type(value)
    value = ast.literal_eval(text)
    return value
  except (ValueError, SyntaxError):
    name = getattr(field_type, '__name__', str(field_type))
    hint = {bool: '; use true or false', int: '; use a whole number', float: '; use a number'}.get(
        field_type, '; use a Python literal')
    raise ConfigError(f'--config.{dotted}={text!r} is not a valid {name}{hint}') from None


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
  """Splits `--config.a.b=value` (or `--config.a.b value`) arguments into (key, value) pairs."""
  out = []
  i = 0
  while i < len(args):
    arg = args[i]
    if not arg.startswith('--config.'):
      raise ConfigError(f'unexpected argument {arg!r}; overrides look like --config.optimizer.lr=3e-4')
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
  return out


_AT_LEAST_ONE = ('data.batch_size', 'data.seq_len', 'train.steps', 'train.log_every',
                 'train.eval_every', 'train.checkpoint_every', 'train.keep_checkpoints',
                 'train.max_bad_steps', 'train.spike_window')
_NOT_NEGATIVE = ('train.eval_batches', 'train.keep_every', 'train.spike_zscore',
                 'train.grace_seconds')


def _get(cfg, dotted: str):
  for part in dotted.split('.'):
    cfg = cfg[part]
  return cfg


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Cross-field checks that types alone cannot express."""
  for key in _AT_LEAST_ONE:
    if _get(cfg, key) < 1:
      raise ConfigError(f'{key}={_get(cfg, key)} must be at least 1')
  for key in _NOT_NEGATIVE:
    if _get(cfg, key) < 0:
      raise ConfigError(f'{key}={_get(cfg, key)} must not be negative')
  m = cfg.model
  if m.n_heads % m.n_kv_heads:
    raise ConfigError(f'model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}; '
                      'choose n_kv_heads that divides n_heads')
  if not m.head_dim and m.d_model % m.n_heads:
    raise ConfigError(f'model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; '
                      'set model.head_dim explicitly')
  if cfg.data.seq_len > m.max_seq_len:
    raise ConfigError(f'data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; '
                      'shorten the sequence or raise model.max_seq_len')
  if cfg.model.remat not in ('none', 'full', 'dots', 'dots_no_batch'):
    raise ConfigError(f'model.remat={cfg.model.remat!r}; choose none, full, dots or dots_no_batch')
  if m.mlp_activation not in ('silu', 'gelu_tanh'):
    raise ConfigError(f'model.mlp_activation={m.mlp_activation!r}; choose silu or gelu_tanh')
  _validate_moe(m.moe)
  if m.rope_scaling and m.rope_scaling.get('type', 'llama3') not in ROPE_SCALING_TYPES:
    raise ConfigError(f"model.rope_scaling type {m.rope_scaling['type']!r} is not supported; "
                      f'lm implements {", ".join(ROPE_SCALING_TYPES)} (or None for unscaled RoPE)')
  if m.layer_types and (len(m.layer_types) != m.n_layers
                        or set(m.layer_types) - {'sliding', 'full'}):
    raise ConfigError(f'model.layer_types={tuple(m.layer_types)} must name each of the '
                      f'{m.n_layers} layers sliding or full, or be () for all alike')
  if m.lora.rank < 0 or not 0.0 <= m.lora.dropout < 1.0:
    raise ConfigError(f'model.lora.rank={m.lora.rank} must be >= 0 and model.lora.dropout='
                      f'{m.lora.dropout} in [0, 1)')
  if cfg.train.microbatches < 1 or cfg.data.batch_size % cfg.train.microbatches:
    raise ConfigError(f'data.batch_size={cfg.data.batch_size} is not divisible by '
                      f'train.microbatches={cfg.train.microbatches}; use a divisor of the batch size')


def _validate_moe(moe) -> None:
  if moe.n_experts < 0 or (moe.n_experts and not 1 <= moe.experts_per_token <= moe.n_experts):
    raise ConfigError(f'model.moe.n_experts={moe.n_experts}, experts_per_token={moe.experts_per_token}: '
                      'need n_experts >= 0 and 1 <= experts_per_token <= n_experts')
  if moe.implementation not in ('ragged', 'dense'):
    raise ConfigError(f'model.moe.implementation={moe.implementation!r}; choose ragged or dense')
  if moe.aux_loss_weight < 0 or moe.z_loss_weight < 0:
    raise ConfigError('model.moe.aux_loss_weight and z_loss_weight must not be negative')


def n_experts(m) -> int:
  """model.moe.n_experts; 0 for model configs saved before Mixture-of-Experts existed."""
  moe = m.get('moe')
  return int(moe.n_experts) if moe else 0


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.n_heads


def reference_markdown() -> str:
  """docs/config_reference.md: every key of base_config() with its default and its comment."""
  import inspect  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  comments = {}
  for line in inspect.getsource(base_config).splitlines() + inspect.getsource(model_config).splitlines():
    m = re.match(r"\s*(\w+)=.*?#\s*(.*)$", line)
    if m:
      comments.setdefault(m.group(1), m.group(2))
  lines = ['# Configuration reference', '',
           'Generated from `lm/config.py` by `python -m lm.config > docs/config_reference.md`; '
           'a test keeps it in sync. Every key can be overridden on the command line as '
           '`--config.SECTION.KEY=VALUE`.', '']
  cfg = base_config()
  for section in cfg.keys():
    lines += [f'## `{section}`', '', '| key | default | notes |', '|---|---|---|']
    for key, value in _flat_items(cfg[section]):
      note = comments.get(key.split('.')[-1], '').replace('|', '\\|')
      shown = repr(value).replace('|', '\\|')
      lines.append(f'| `{section}.{key}` | `{shown}` | {note} |')
    lines.append('')
  return '\n'.join(lines)


def _flat_items(node, prefix=''):
  for key in node.keys():
    value = node[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


if __name__ == '__main__':
  print(reference_markdown())
