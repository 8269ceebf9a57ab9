"""Text generation for `lm generate`, `lm eval` and the API: `Generator` (text in, text out, on a
mesh) runs the rollout engine (lm/eval/rollout.py: continuous batching over a slot cache).

`make_generate_fn` is the batch generator the engine replaced, kept as the reference the engine is
tested against and the baseline of the decode benchmark (`lm bench rollout`): one jitted prefill
of the prompts, then a `lax.while_loop` of one-token decode steps over the whole batch until its
last row ends.

Prompts of different lengths are left-padded to a shared length P, so every row's next token is
written to the same cache slot; padding carries segment id 0 and is never attended to, and each
row's positions start at 0 at its first real token, so a padded row computes exactly what it would
alone. The cache holds S = P + max_new_tokens slots: [L, B, S, G, K] keys and values, sharded like
the batch (rows) and the KV heads (tensor axis).

Stops: the end-of-sequence id and `stop` strings. A stop string's token ids end the row on device
(saving the remaining steps); the decoded text is then cut at the first stop string, which is
exact even where the model spelled the string with other tokens.

  python -m lm.eval.generate --bench [--config configs/quickstart.py]   # decode tokens/s
"""

from __future__ import annotations

import dataclasses
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding as sharding_lib
from lm import config as config_lib
from lm.model import transformer
from lm.errors import UserError
from lm.eval.rollout import Request, RolloutEngine, Sampling, cache_sharding, sample_logits  # noqa: F401 (public here too)
from lm.train.state import ModelSpec


def init_cache(model_cfg, B: int, S: int) -> dict:
  """The model's empty decoding cache (lm.model.transformer.init_cache) for B rows of S slots."""
  return transformer.init_cache(model_cfg, B, S)


def _write(cache, index, positions_BT, segment_ids_BT):
  """The cache with this call's positions and segment ids at slots [index, index + T)."""
  put = lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new, index, axis=1)
  return {**cache, 'index': index, 'positions': put(cache['positions'], positions_BT),
          'segment_ids': put(cache['segment_ids'], segment_ids_BT)}


def _stop_length(out_BN, t, stop_ids):
  """[B] int: length of the stop token sequence the generated row ends with at step t, else 0."""
  length_B = jnp.zeros(out_BN.shape[0], jnp.int32)
  for seq in stop_ids:
    m = len(seq)
    if m > out_BN.shape[1]:
      continue  # cannot occur within max_new_tokens
    window = jax.lax.dynamic_slice_in_dim(out_BN, jnp.maximum(t + 1 - m, 0), m, axis=1)
    hit_B = (t + 1 >= m) & jnp.all(window == jnp.asarray(seq, jnp.int32), axis=1)
    length_B = jnp.where(hit_B & (length_B == 0), m, length_B)
  return length_B


def make_generate_fn(spec: ModelSpec, sampling: Sampling, eos_id: int, pad_id: int,
                     stop_ids: tuple = (), cache_sharding=None):
  """fn(params, tokens_BP left-padded, lengths_B, rng) -> (out_BN, n_B): the generated ids (pad
  after the end) and, per row, how many come before the eos or stop tokens that ended it.
  Jit it with the parameter and batch shardings."""
  N = sampling.max_new_tokens

  def generate(params, tokens_BP, lengths_B, rng):
    model = spec.bind(params)
    B, P = tokens_BP.shape
    cache = init_cache(spec.cfg, B, P + N)
    if cache_sharding is not None:
      cache = {**cache, 'layers': jax.lax.with_sharding_constraint(cache['layers'], cache_sharding)}
    start_B = P - lengths_B
    slot_P = jnp.arange(P, dtype=jnp.int32)
    real_BP = slot_P[None] >= start_B[:, None]
    positions_BP = jnp.where(real_BP, slot_P[None] - start_B[:, None], 0)
    segments_BP = real_BP.astype(jnp.int32)
    cache = _write(cache, jnp.int32(0), positions_BP, segments_BP)
    logits_BPV, cache = model(tokens_BP, positions_BP, segments_BP, cache)
    rng, step_rng = jax.random.split(rng)
    first_B = sample_logits(logits_BPV[:, -1], step_rng, sampling)
    out_BN = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first_B)
    done_B = (first_B == eos_id) | (_stop_length(out_BN, 0, stop_ids) > 0)
    n_B = jnp.where(done_B, 0, 1)

    def cond(carry):
      t, _, _, done_B, _, _ = carry
      return (t < N) & ~jnp.all(done_B)

    def body(carry):
      t, cache, out_BN, done_B, n_B, rng = carry
      token_B1 = out_BN[:, t - 1][:, None]
      pos_B1 = (lengths_B + t - 1)[:, None]
      cache = _write(cache, P + t - 1, pos_B1, jnp.ones_like(pos_B1))
      logits_B1V, cache = model(token_B1, pos_B1, jnp.ones_like(pos_B1), cache)
      rng, step_rng = jax.random.split(rng)
      next_B = jnp.where(done_B, pad_id, sample_logits(logits_B1V[:, 0], step_rng, sampling))
      out_BN = out_BN.at[:, t].set(next_B)
      eos_B, stop_B = next_B == eos_id, _stop_length(out_BN, t, stop_ids)
      n_B = jnp.where(done_B, n_B, jnp.where(eos_B, t, t + 1 - stop_B))
      return t + 1, cache, out_BN, done_B | eos_B | (stop_B > 0), n_B, rng

    carry = (jnp.int32(1), cache, out_BN, done_B, n_B, rng)
    _, _, out_BN, _, n_B, _ = jax.lax.while_loop(cond, body, carry)
    return out_BN, n_B

  return generate


COMPILED: dict = {}  # jitted generate/score functions by (architecture, mesh, shapes, settings)


def model_key(spec: ModelSpec) -> str:
  return json.dumps(spec.cfg.to_dict(), sort_keys=True, default=str)


class Generator:
  """Text in, text out, for one model on a mesh. Compiled functions are cached per shape."""

  def __init__(self, cfg, params: dict, tokenizer, *, mesh=None, spec: ModelSpec | None = None):
    self.cfg, self.tokenizer = cfg, tokenizer
    self.spec = spec or ModelSpec(cfg.model)
    self.mesh = mesh or sharding_lib.make_mesh(cfg.mesh)
    rules = tuple(cfg.mesh.rules)
    self.param_shardings = sharding_lib.param_shardings(
        self.spec.logical_axes, self.spec.shapes, self.mesh, rules)
    self.params = jax.device_put(params, {k: self.param_shardings[k] for k in params})
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, rules)
    self.dp = sharding_lib.data_parallel_size(self.mesh, rules)
    self.rules = rules

  def generate_ids(self, prompts: list[list[int]], sampling: Sampling, *, stop_ids=(),
                   seed: int = 0, batch_size: int = 32, progress: str = '') -> list[list[int]]:
    """Generated ids per prompt, without the prompt and without the eos/stop tokens.
    `progress`: a label for a progress bar with ETA on stderr ('' for none)."""
    if sampling.top_k > self.cfg.model.vocab_size:
      raise UserError(f'top_k={sampling.top_k} exceeds the vocabulary ({self.cfg.model.vocab_size} '
                      'tokens); use at most that, or 0 for no top-k cut')
    if batch_size < 1:
      raise UserError(f'batch size {batch_size} must be at least 1')
    limit = self.cfg.model.max_seq_len - sampling.max_new_tokens
    if limit < 1:
      raise UserError(f'max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in '
                      f'model.max_seq_len={self.cfg.model.max_seq_len}')
    B = max(self.dp, -(-min(batch_size, len(prompts)) // self.dp) * self.dp)
    stop_ids = tuple(tuple(s) for s in stop_ids if s)
    requests = [Request(tuple(p[-limit:]) or (self.start_id,), stop=stop_ids) for p in prompts]
    bar = progress_bar(None, progress, total=len(prompts), unit='prompt')
    done = None if bar is None else (lambda i: bar.update(1))
    try:
      results = self.engine(sampling, B).run(self.params, requests, jax.random.key(seed),
                                             on_done=done)
    finally:
      if bar is not None:
        bar.close()
    return [r[0].ids for r in results]

  def engine(self, sampling: Sampling, slots: int) -> RolloutEngine:
    """The rollout engine of `slots` concurrent sequences; its compiled programs are shared by
    every Generator of the same architecture and mesh (base and fine-tuned models in one
    comparison compile once)."""
    key = ('rollout', model_key(self.spec), self.mesh, repr(self.rules), sampling,
           self.tokenizer.eos_id, self.tokenizer.pad_id, slots)
    if key not in COMPILED:
      COMPILED[key] = RolloutEngine(self.spec, sampling, eos_id=self.tokenizer.eos_id,
                                    pad_id=self.tokenizer.pad_id, slots=slots,
                                    cache_sharding=cache_sharding(self.spec.cfg, self.mesh, self.rules))
    return COMPILED[key]

  @property
  def start_id(self) -> int:
    """What an empty prompt (and a batch's filler rows) holds: BOS, else EOS as lm-eval-harness
    does for tokenizers without one (Qwen: bos_token null), else the pad id."""
    tok = self.tokenizer
    return next(i for i in (tok.bos_id, tok.eos_id, tok.pad_id) if i is not None)

  def generate(self, prompts: list[str], sampling: Sampling, *, stop=(), seed: int = 0,
               batch_size: int = 32, bos: bool | None = None, progress: str = '') -> list[str]:
    """Completions of `prompts`, each cut before the first stop string. Prompts start with BOS
    where the tokenizer's own settings add one (`bos=None`), or as `bos` says."""
    bos = self.tokenizer.add_bos if bos is None else bos
    ids = [self.tokenizer.encode(p, bos=bos) for p in prompts]
    stop_ids = [self._stop_tokens(s) for s in stop]
    outs = self.generate_ids(ids, sampling, stop_ids=stop_ids, seed=seed, batch_size=batch_size,
                             progress=progress)
    return [cut_at_stop(self.tokenizer.decode(o), stop) for o in outs]

  def chat(self, prompts: list[str], sampling: Sampling, *, template: str = 'auto',
           system: str | None = None, seed: int = 0, batch_size: int = 32) -> list[str]:
    """Replies to `prompts`, each the user's message of a new conversation rendered with chat
    template `template` (data.chat_template's names); generation stops at the end of the turn."""
    from lm.data import chat as chat_lib  # pylint: disable=import-outside-toplevel
    encoder = chat_lib.ChatEncoder(chat_lib.get_template(template, self.tokenizer), self.tokenizer)
    head = [{'role': 'system', 'content': system}] if system else []
    ids = [encoder.encode_prompt(head + [{'role': 'user', 'content': p}]).tolist() for p in prompts]
    outs = self.generate_ids(ids, sampling, stop_ids=[[i] for i in encoder.stop_ids()], seed=seed,
                             batch_size=batch_size)
    return [self.tokenizer.decode(o) for o in outs]

  def _stop_tokens(self, text: str) -> list[int]:
    # SentencePiece prefixes a word boundary to a string encoded on its own; decode-compare picks
    # the spelling that reproduces the string, or gives up on device-side stopping for it.
    ids = self.tokenizer.encode(text)
    return ids if self.tokenizer.decode(ids) == text else []


def progress_bar(iterable, label: str, **kwargs):
  """`iterable`, with a tqdm bar (count, rate, ETA) on stderr when `label` is set."""
  if not label:
    return iterable
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(iterable, desc=label, leave=False, dynamic_ncols=True, **kwargs)


def read_prompts(path: str) -> list[str]:
  """One prompt per line, or a `{"prompt": ...}` record per line of a .jsonl file (multi-line prompts)."""
  import json  # pylint: disable=import-outside-toplevel
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\n') for line in f if line.strip()]
  except FileNotFoundError:
    raise UserError(f'prompts file {path} not found') from None
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'prompts file {path} cannot be read ({getattr(e, "strerror", None) or e})') from None
  if not lines:
    raise UserError(f'prompts file {path} holds no prompt')
  if not path.endswith('.jsonl'):
    return lines
  prompts = []
  for i, line in enumerate(lines, 1):
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise UserError(f'{path}:{i}: malformed JSON ({e.msg})') from None
    if not isinstance(record, dict) or not isinstance(record.get('prompt'), str):
      raise UserError(f'{path}:{i}: expected an object with a string "prompt" field')
    prompts.append(record['prompt'])
  return prompts


def cut_at_stop(text: str, stop) -> str:
  cuts = [text.find(s) for s in stop if s and s in text]
  return text[:min(cuts)] if cuts else text


def benchmark(cfg, *, batch_sizes=(1, 8), prompt_len: int = 64, new_tokens: int = 128,
              reps: int = 3, params=None, compare_uncached: bool = False) -> list[dict]:
  """Decode tokens/s of `cfg.model` (random weights unless given): greedy, fixed length (no eos).
  Decode time is the full generation minus a prefill-only run of the same prompts. With
  `compare_uncached`, also greedy decoding that recomputes the whole forward pass each step."""
  spec = ModelSpec(cfg.model)
  params = params if params is not None else jax.jit(spec.init)(jax.random.key(0))
  full = jax.jit(make_generate_fn(spec, Sampling(max_new_tokens=new_tokens), eos_id=-1, pad_id=0))
  prefill = jax.jit(make_generate_fn(spec, Sampling(max_new_tokens=1), eos_id=-1, pad_id=0))

  @jax.jit
  def uncached(params, tokens_BP, lengths_B, rng):
    """The baseline a cache replaces: every step recomputes the full forward pass (fixed length
    P + N, causal, so the not-yet-generated tail does not affect the logits read)."""
    del lengths_B, rng
    B, P = tokens_BP.shape
    buf = jnp.zeros((B, P + new_tokens), jnp.int32).at[:, :P].set(tokens_BP)

    def body(t, buf):
      logits_BTV = spec.bind(params)(buf)
      next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BTV, P + t - 1, 1, False), -1)
      return jax.lax.dynamic_update_slice_in_dim(buf, next_B[:, None].astype(jnp.int32), P + t, 1)

    return jax.lax.fori_loop(0, new_tokens, body, buf)

  rng = np.random.default_rng(0)
  rows = []
  for B in batch_sizes:
    tokens = rng.integers(3, cfg.model.vocab_size, (B, prompt_len), dtype=np.int32)
    args = (params, tokens, np.full((B,), prompt_len, np.int32), jax.random.key(0))
    timings = {}
    runs = (('prefill', prefill), ('total', full)) + ((('uncached', uncached),) if compare_uncached else ())
    for name, f in runs:
      jax.block_until_ready(f(*args))  # compile
      best = math.inf
      for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        best = min(best, time.perf_counter() - start)
      timings[name] = best
    decode_s = max(timings['total'] - timings['prefill'], 1e-9)
    rows.append({'batch': B, 'prompt_len': prompt_len, 'new_tokens': new_tokens,
                 'prefill_ms': timings['prefill'] * 1e3,
                 'decode_tokens_per_s': B * (new_tokens - 1) / decode_s,
                 'ms_per_step': decode_s / (new_tokens - 1) * 1e3,
                 'end_to_end_tokens_per_s': B * new_tokens / timings['total'],
                 'uncached_tokens_per_s': B * new_tokens / timings.get('uncached', math.nan)})
  return rows


def main(argv=None) -> int:
  import argparse  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(prog='python -m lm.eval.generate')
  parser.add_argument('--bench', action='store_true', required=True)
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--batch', default='1,8')
  parser.add_argument('--prompt-len', type=int, default=64)
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--uncached', action='store_true', help='also time decoding without a cache')
  parser.add_argument('--reps', type=int, default=3, help='timed repetitions (best kept)')
  args = parser.parse_args(argv)
  cfg = config_lib.load_config(args.config)
  print(f'decode bench: {args.config}, {jax.device_count()} x {jax.devices()[0].device_kind}, '
        f'prompt {args.prompt_len} + {args.new_tokens} new tokens, greedy, KV cache')
  for r in benchmark(cfg, batch_sizes=tuple(int(b) for b in args.batch.split(',')),
                     prompt_len=args.prompt_len, new_tokens=args.new_tokens, reps=args.reps,
                     compare_uncached=args.uncached):
    print(f'batch {r["batch"]:3d}: {r["decode_tokens_per_s"]:9,.0f} decode tokens/s '
          f'({r["ms_per_step"]:.2f} ms/step), prefill {r["prefill_ms"]:.1f} ms, '
          f'end to end {r["end_to_end_tokens_per_s"]:,.0f} tokens/s'
          + (f'; without a cache {r["uncached_tokens_per_s"]:,.0f} tokens/s' if args.uncached else ''))
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
