"""GRPO with verifiable rewards: sample -> score -> K optimizer steps, through the one train step.

A round takes batch_size / G prompts (a seeded reshuffle per epoch of the prompt records: the
environment's own or `grpo.prompts`), samples G episodes of each from the current policy with the
rollout engine (lm/eval/rollout.py: the G copies share one prefill), scores them with the
environment `grpo.environment` names (lm/eval/environments.py; by default the reward functions of
`grpo.rewards`, lm/eval/rewards.py), normalises the rewards within each group into advantages,
keeps the sampling policy's log-probs of the model's tokens as the engine recorded them (equal to
the trainer's forward on the same weights: tests/eval/test_rollout.py), and runs
`grpo.updates_per_batch` steps of the ordinary train step with the `grpo` objective
(lm/train/objectives.py) on those rows. The step is the same one every mode uses.

An episode is one model turn, or with an environment that has a tool (`tool_stop`, `max_turns`)
several: a turn that ends in a tool call gets the tool's output appended to its context and the
engine samples the next turn from there. Tool outputs stay in the row with loss weight 0 (and
need no log-prob); each model turn keeps the log-probs the engine recorded for it. A
single-turn environment samples exactly what the plain loop does.

Everything a round draws derives from (train.seed, round): the prompts from the epoch's
permutation and the sampler's key from fold_in(key(seed), round), so the checkpoint's record of
the round (with the optimizer state) resumes the exact sequence an uninterrupted run would see.
An environment that raises, times out or returns malformed output skips the round or stops the
run (`grpo.on_error`); skipped rounds are counted in the checkpoint, so resume stays exact.

With `grpo.overlap`, round r + 1 samples and is scored (in a thread, from a copy of the weights)
while round r trains: one round off-policy, which the clipped importance ratio pi / pi_old
corrects, pi_old being the sampling weights' log-probs. The first round samples before training,
as without overlap. A checkpoint carries the sampled but untrained round (`pending` in its data
state), so a resumed run trains on exactly the samples an uninterrupted one would. Each round logs
sample_s (sampling and scoring), train_s, wait_s (the trainer idle, waiting for samples),
overlap_s (sampling hidden behind training: sample_s - wait_s) and round_s.

This module sits with lm/train/loop.py above lm/eval (it imports the engine and environments).
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from lm.data import chat, pipeline, sources
from lm.errors import ConfigError, DataError, Diverged, Preempted
from lm.eval import environments
from lm.eval import generate as generate_lib
from lm.eval import rollout
from lm import sharding as sharding_lib
from lm.io import pretrained
from lm.train import objectives, preemption, rundir, trackers
from lm.train.loop import Trainer, make_checkpointer, restore
from lm.train.metrics import MetricWriter
from lm.train.objectives import token_log_probs


def check_config(cfg):
  """Bad GRPO settings fail here, in one line, before any data is read or anything compiles.
  Returns (name, environment): `grpo.environment`, or the reward functions of `grpo.rewards`."""
  g = cfg.grpo
  name, env = environments.resolve(g.environment, rewards=g.rewards, weights=g.reward_weights)
  if g.teacher_coef > 0 and not cfg.distill.teacher:
    raise ConfigError(f'grpo.teacher_coef={g.teacher_coef} is on-policy distillation and needs a '
                      'teacher: set --config.distill.teacher=an lm run or Hugging Face directory '
                      "with the student's tokenizer")
  if g.group_size < 2 or cfg.data.batch_size % g.group_size:
    raise ConfigError(f'grpo.group_size={g.group_size} must be at least 2 and divide '
                      f'data.batch_size={cfg.data.batch_size} (batch_size / group_size prompts per round)')
  if g.updates_per_batch < 1 or cfg.train.steps % g.updates_per_batch:
    raise ConfigError(f'train.steps={cfg.train.steps} must be a multiple of '
                      f'grpo.updates_per_batch={g.updates_per_batch}')
  if g.max_new_tokens + 2 > cfg.data.seq_len:
    raise ConfigError(f'grpo.max_new_tokens={g.max_new_tokens} leaves no room for a prompt in '
                      f'data.seq_len={cfg.data.seq_len}; raise data.seq_len')
  if g.on_error not in ('stop', 'skip'):
    raise ConfigError(f'grpo.on_error={g.on_error!r}; choose stop (the run stops) or skip (the '
                      'round is skipped)')
  if type(env).records is environments.Environment.records and (
      not g.prompts or not os.path.isfile(g.prompts)):
    raise ConfigError(f'grpo.prompts={g.prompts!r} is not a file; name a .jsonl/.json of prompt '
                      'records, e.g. ../shared/data/gsm8k/train.jsonl')
  objectives.from_config(cfg)
  return name, env


def split_devices(cfg, devices) -> tuple[list, list | None]:
  """(the trainer's devices, the sampler's or None): with grpo.sampler_devices=N the last N
  devices sample and the others train; one line, before any compile, where that cannot work."""
  n = int(cfg.grpo.sampler_devices)
  if not n:
    return list(devices), None
  if n >= len(devices):
    raise ConfigError(f'grpo.sampler_devices={n} leaves none of the {len(devices)} devices to train '
                      f'on; set at most {len(devices) - 1}, or 0 to share them')
  if jax.process_count() > 1:
    raise ConfigError('grpo.sampler_devices applies to one process; with several, leave it 0 '
                      '(sampler and trainer share every device)')
  if cfg.data.batch_size % n:
    raise ConfigError(f'grpo.sampler_devices={n} must divide data.batch_size={cfg.data.batch_size} '
                      '(the sampler splits its concurrent sequences over its devices)')
  return list(devices[:-n]), list(devices[-n:])


def sampler_mesh(cfg, devices):
  """The sampler's mesh over its own devices: the configured axis names, all of it data-parallel
  (each device holds the whole model and its share of the sequences)."""
  shape = {name: 1 for name in cfg.mesh.shape}
  shape['data'] = len(devices)
  return jax.sharding.Mesh(np.asarray(devices).reshape(tuple(shape.values())), tuple(shape))


def check_sampler_memory(spec, devices) -> None:
  """One line, before any compile, when the model's weights alone exceed a sampler device."""
  stats = devices[0].memory_stats() if hasattr(devices[0], 'memory_stats') else None
  limit = (stats or {}).get('bytes_limit')  # None where the device does not say (CPU)
  need = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in spec.shapes.values())
  if limit and need > limit:
    raise ConfigError(f'grpo.sampler_devices: the model\'s weights need {need / 2**30:.1f} GiB on each '
                      f'sampler device ({devices[0].device_kind}: {limit / 2**30:.1f} GiB); give '
                      'sampling more memory or leave grpo.sampler_devices=0 to share the mesh')


def load_prompts(cfg, env=None) -> list[dict]:
  """The prompt records: the environment's own, else `grpo.prompts` (checked against
  `grpo.prompt_format` unless the environment writes the prompts)."""
  records = env.records() if env is not None else None
  if records is not None:
    if not records:
      raise ConfigError(f'grpo.environment={cfg.grpo.environment!r} gave no prompt records')
    return list(records)
  records = list(sources.load(cfg.grpo.prompts).items)
  if not records:
    raise DataError(f'{cfg.grpo.prompts}: no records')
  if env is not None and env.prompt(records[0]) is not None:
    return records
  try:
    cfg.grpo.prompt_format.format(**records[0])
  except (KeyError, IndexError, AttributeError, TypeError) as e:
    raise ConfigError(f'grpo.prompt_format={cfg.grpo.prompt_format!r} does not fit the records '
                      f'of {cfg.grpo.prompts} (fields {sorted(records[0])}): {e!r}') from None
  return records


def split_heldout(records: list[dict], size: int) -> tuple[list[dict], list[dict]]:
  """(training records, held-out records): the last `size` are held out and never trained on."""
  if size and size >= len(records):
    raise ConfigError(f'grpo.eval_size={size} holds out all {len(records)} prompt records; '
                      'hold out fewer')
  return (records[:-size], records[-size:]) if size else (records, [])


def prompt_encoder(cfg, tokenizer, env=None):
  """(fn(record) -> prompt ids, end-of-turn ids): the environment's prompt text of the record (or
  `grpo.prompt_format` filled from it), as plain text, or with `grpo.chat_template` set as the
  user turn of a conversation in that template (the mechanism of `lm generate --chat` and
  data.chat_template), ending in the assistant header."""
  g = cfg.grpo

  def text(record):
    own = env.prompt(record) if env is not None else None
    return g.prompt_format.format(**record) if own is None else own

  if not g.chat_template:
    return (lambda record: tokenizer.encode(text(record), bos=tokenizer.add_bos)), ()
  try:
    encoder = chat.ChatEncoder(chat.get_template(g.chat_template, tokenizer), tokenizer)
  except DataError as e:
    raise ConfigError(f'grpo.chat_template={g.chat_template!r}: {e}') from None
  return (lambda record: encoder.encode_prompt(
      [{'role': 'user', 'content': text(record)}]).tolist()), tuple(encoder.stop_ids())


def round_prompts(n_records: int, per_round: int, seed: int, round_index: int) -> list[int]:
  """Record indices of a round: consecutive slices of a per-epoch seeded permutation."""
  out = []
  for k in range(round_index * per_round, (round_index + 1) * per_round):
    epoch, i = divmod(k, n_records)
    out.append(int(np.random.default_rng([seed, 0x67727030, epoch]).permutation(n_records)[i]))
  return out


def group_advantages(rewards_B: np.ndarray, group_size: int, scale: bool) -> np.ndarray:
  """(r - mean of its group), divided by the group's std (+1e-4) when `scale`."""
  r = rewards_B.reshape(-1, group_size)
  adv = r - r.mean(axis=1, keepdims=True)
  if scale:
    adv = adv / (r.std(axis=1, keepdims=True) + 1e-4)
  return adv.reshape(-1).astype(np.float32)


def completion_rows(prompts: list[list[int]], completions: list[list[int]], ends: list,
                    pad_id: int, seq_len: int) -> dict:
  """One row per prompt + completion; weights on the completion's tokens and on the token that
  ended it (`ends[b]`: eos or the chat template's end of turn; None when it was cut by length or
  a stop string), so stopping is learned too. Prompts are cut from the left to fit."""
  return episode_rows(prompts, [[(list(c) + ([] if e is None else [e]), True)]
                                for c, e in zip(completions, ends)], pad_id, seq_len)


def episode_rows(prompts: list[list[int]], segments: list[list[tuple[list[int], bool]]],
                 pad_id: int, seq_len: int) -> dict:
  """One row per prompt + episode, the episode a list of (ids, trained) segments: the model's
  turns (trained, weight 1) and tool outputs (in the context, weight 0). Prompts are cut from
  the left to fit."""
  B = len(prompts)
  rows = {k: np.zeros((B, seq_len), np.float32 if k == 'weights' else np.int32)
          for k in ('tokens', 'targets', 'weights', 'segment_ids', 'positions')}
  rows['tokens'][:], rows['targets'][:] = pad_id, pad_id
  for b, (p, parts) in enumerate(zip(prompts, segments)):
    c = [i for ids, _ in parts for i in ids]
    w = [float(trained) for ids, trained in parts for _ in ids]
    p = list(p)[-(seq_len + 1 - len(c)):]
    ids = np.asarray(p + c, np.int32)
    n = len(ids) - 1
    rows['tokens'][b, :n], rows['targets'][b, :n] = ids[:-1], ids[1:]
    rows['weights'][b, len(p) - 1:n] = w
    rows['segment_ids'][b, :n] = 1
    rows['positions'][b, :n] = np.arange(n)
  return rows


def _tool_call_end(tokenizer, ids: list[int], stops) -> int | None:
  """The fewest leading ids whose text holds one of `stops` (the end of a tool call), or None."""
  if not stops or not any(s in tokenizer.decode(ids) for s in stops):
    return None
  return next(k for k in range(1, len(ids) + 1)
              if any(s in tokenizer.decode(ids[:k]) for s in stops))


def sampling_log_probs(weights_BT: np.ndarray, logps: list) -> np.ndarray:
  """[B, T] float32: each row's sampled log-probs at its weighted tokens (the model's own: its
  completion and end, or an episode's model turns), in order; completion_rows and episode_rows
  weigh exactly those."""
  out = np.zeros(weights_BT.shape, np.float32)
  for b, lp in enumerate(logps):
    at = np.flatnonzero(weights_BT[b])
    out[b, at] = np.asarray(lp, np.float32)[:len(at)]
  return out


class Rollouts(NamedTuple):
  """A round's samples: `prompts` (cut to fit a row), `completions` (ids before the end), `ends`
  (the eos / end-of-turn id that ended each, learned as its end; None when cut by length or a
  stop string), `texts` (decoded, cut at the first stop string) and `logps` (log p of each
  completion id and its end id under the sampling policy, as the trainer's forward computes it)."""
  prompts: list
  completions: list
  ends: list
  texts: list
  logps: list


class Sampler:
  """The policy's completions of a round's prompts, and their log-probs at sampling time, from
  the rollout engine (lm/eval/rollout.py): the G copies of a prompt share one prefill.

  `sample(params, prompt_ids, rng) -> Rollouts`; calling the sampler gives the first four fields
  (prompts, completions, ends, texts) as before the engine recorded log-probs."""

  def __init__(self, trainer, tokenizer, end_ids: tuple = (), devices=None):
    """`end_ids`: tokens besides eos that end a completion and are learned as its end (a chat
    template's end of turn). `devices`: the sampler's own (grpo.sampler_devices), to which each
    round's weights are copied; None: the trainer's mesh."""
    cfg, g = trainer.cfg, trainer.cfg.grpo
    self.trainer, self.tokenizer = trainer, tokenizer
    rules = tuple(cfg.mesh.rules)
    self.mesh, self.param_shardings = trainer.mesh, None
    if devices is not None:
      check_sampler_memory(trainer.spec, devices)
      self.mesh = sampler_mesh(cfg, devices)
      self.param_shardings = sharding_lib.param_shardings(
          trainer.spec.logical_axes, trainer.spec.shapes, self.mesh, rules)
    self.sampling = generate_lib.Sampling(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                          top_k=g.top_k, top_p=g.top_p)
    self.stop = tuple(s for s in g.stop if s)
    self.end_ids = {tokenizer.eos_id, *end_ids}
    stop_ids = tuple(tuple(tokenizer.encode(s)) for s in self.stop
                     if tokenizer.decode(tokenizer.encode(s)) == s)
    self.stop_ids = stop_ids + tuple((i,) for i in sorted(set(end_ids) - {tokenizer.eos_id}))
    self.prompt_len = cfg.data.seq_len - g.max_new_tokens  # prompt + completion fit one row
    self.engine = rollout.RolloutEngine(
        trainer.spec, self.sampling, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
        slots=cfg.data.batch_size,
        cache_sharding=rollout.cache_sharding(trainer.spec.cfg, self.mesh, rules))
    spec = trainer.spec
    self.log_probs = jax.jit(lambda params, batch: token_log_probs(spec.bind(params), batch),
                             in_shardings=(trainer.shardings.params, trainer.batch_sharding))

  def __call__(self, params, prompt_ids: list[list[int]], rng):
    return tuple(self.sample(params, prompt_ids, rng))[:4]

  def place(self, params):
    """The weights where the sampler runs: the trainer's arrays, or copies on its own devices."""
    if self.param_shardings is None:
      return params
    return jax.device_put(params, {k: self.param_shardings[k] for k in params})

  def sample(self, params, prompt_ids: list[list[int]], rng) -> Rollouts:
    params = self.place(params)
    cut = [list(p[-self.prompt_len:]) for p in prompt_ids]
    # Consecutive copies of a prompt (a round's groups) are one request of n samples.
    requests = []
    for p in map(tuple, cut):
      if requests and requests[-1].prompt == p:
        requests[-1] = rollout.Request(p, requests[-1].n + 1, self.stop_ids)
      else:
        requests.append(rollout.Request(p, 1, self.stop_ids))
    samples = [s for r in self.engine.run(params, requests, rng) for s in r]
    completions = [s.ids for s in samples]
    # A completion ended on eos (or an end of turn) learns that end; stop strings end it too,
    # but are not learned.
    ends = [s.stop[0] if s.stop and len(s.stop) == 1 and s.stop[0] in self.end_ids else None
            for s in samples]
    logps = [s.logps[:len(s.ids) + (e is not None)] for s, e in zip(samples, ends)]
    texts = [generate_lib.cut_at_stop(self.tokenizer.decode(c), self.stop) for c in completions]
    return Rollouts(cut, completions, ends, texts, logps)


class Episodes(NamedTuple):
  """A round's episodes: `prompts` (cut to fit a row), `segments` ([(ids, trained)] per sample:
  the model's turns, trained, each with the id that ended it when it is learned, and the tool
  outputs between them, not trained), `texts` (the episode as the environment scores it),
  `calls` (tool calls per sample) and `logps` (per sample, log p of every trained id under the
  sampling policy as the engine recorded it, in order: one per weight episode_rows sets)."""
  prompts: list
  segments: list
  texts: list
  calls: list
  logps: list


def run_episodes(sampler, env, env_name: str, params, prompt_ids, records, record_ids, rng, *,
                 timeout_s: float) -> Episodes:
  """Each prompt's episode: a model turn; when it ends in a tool call (`env.tool_stop`, within
  env.max_turns), the tool's output appended to the context and the engine samples the next turn
  from there (`sampler.sample`).

  Turn 0 samples every prompt with `rng` itself, so a single-turn environment samples exactly
  what the plain loop does; turn t > 0 samples only the episodes still going, with
  fold_in(rng, t). Generation does not stop at a tool call: the turn is cut where the call ends
  (its log-probs with it), and the next turn's context is the row's own tokens up to there, so
  each turn's recorded log-probs are the trainer's forward on the row."""
  tokenizer, B = sampler.tokenizer, len(prompt_ids)
  contexts, cut = [list(p) for p in prompt_ids], None
  segments, pieces = [[] for _ in range(B)], [[] for _ in range(B)]
  calls, logps = [0] * B, [[] for _ in range(B)]
  active = list(range(B))
  for turn in range(env.max_turns):
    turn_rng = rng if turn == 0 else jax.random.fold_in(rng, turn)
    got = sampler.sample(params, [contexts[b] for b in active], turn_rng)
    if turn == 0:
      cut, contexts = got.prompts, [list(p) for p in got.prompts]
    going = []
    for j, b in enumerate(active):
      c, end, lp = list(got.completions[j]), got.ends[j], [float(x) for x in got.logps[j]]
      k = (_tool_call_end(tokenizer, c, env.tool_stop)
           if end is None and turn + 1 < env.max_turns else None)
      out = None
      if k is not None:
        c = c[:k]
        text = ''.join(pieces[b]) + tokenizer.decode(c)
        sample = environments.describe(b, record_ids[b], text)
        out = environments.call(env_name, 'tool', env.tool, (records[b], text), sample, timeout_s)
        if out is not None and not isinstance(out, str):
          raise environments.EnvironmentFailure(
              f'grpo environment {env_name}: tool returned {type(out).__name__} {out!r:.40} on '
              f'{sample}; a tool returns its output as a string, or None to end the episode')
      if out is None:  # the episode ends with this turn
        segments[b].append((c + ([] if end is None else [end]), True))
        logps[b] += lp[:len(c) + (end is not None)]
        pieces[b].append(got.texts[j] if k is None else tokenizer.decode(c))
        continue
      out_ids = tokenizer.encode(out)
      segments[b] += [(c, True), (out_ids, False)]
      logps[b] += lp[:len(c)]
      pieces[b] += [tokenizer.decode(c), out]
      calls[b] += 1
      contexts[b] = contexts[b] + c + out_ids
      if len(contexts[b]) <= sampler.prompt_len:  # room for another turn in the row
        going.append(b)
    active = going
    if not active:
      break
  return Episodes(cut, segments, [''.join(p) for p in pieces], calls, logps)


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) GRPO; returns the final metrics (`lm train` with train.objective=grpo)."""
  pretrained.resolve_config(cfg)  # as lm.train.loop.train: the shape and tokenizer of init_from
  env_name, env = check_config(cfg)
  trackers.names(cfg)  # an unknown or uninstalled tracker, before any work
  with rundir.removed_on_user_error(os.path.abspath(workdir), is_main=jax.process_index() == 0):
    return _train(cfg, rundir.prepare(workdir), env_name, env, progress=progress)


def heldout_reward(sampler, env, env_name, params, records, encode_prompt, cfg) -> float:
  """Mean reward of one episode per held-out record, all given to the engine at once (it keeps
  data.batch_size sampling), sampled with the same key at every evaluation so that evaluations
  differ by the policy alone."""
  ids = [f'held-out {i}' for i in range(len(records))]
  got = run_episodes(sampler, env, env_name, sampler.place(params), [encode_prompt(r) for r in records], records,
                     ids, jax.random.key(cfg.train.seed ^ 0x68656c64),
                     timeout_s=cfg.grpo.env_timeout_s)
  reward, _ = environments.score(env_name, env, got.texts, records, ids, cfg.grpo.env_timeout_s)
  return float(np.mean(reward))


def _train(cfg, workdir, env_name, env, *, progress=True) -> dict:
  started = time.perf_counter()
  g = cfg.grpo
  is_main = jax.process_index() == 0
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  pipeline.check_vocab(tokenizer, cfg.model.vocab_size)
  records, heldout = split_heldout(load_prompts(cfg, env), g.eval_size)
  encode_prompt, end_ids = prompt_encoder(cfg, tokenizer, env)
  train_devices, sample_devices = split_devices(cfg, jax.devices())
  trainer = Trainer(cfg, devices=train_devices)
  sampler = Sampler(trainer, tokenizer, end_ids, devices=sample_devices)
  ckpt = make_checkpointer(cfg, workdir, trainer.labels)
  skipped = 0  # rounds skipped for an environment's failure (grpo.on_error=skip)
  if ckpt.latest_step() is not None:
    state, data_state = restore(trainer, ckpt)
    skipped = int(data_state.get('skipped', 0))
    if data_state.get('round', -1) - skipped != int(state.step) // g.updates_per_batch:
      raise DataError(f'{ckpt.directory}: checkpoint step {int(state.step)} and sampler round '
                      f'{data_state.get("round")} disagree; the checkpoint is not from this GRPO run')
    if is_main:
      tqdm.write(f'resumed from {ckpt.directory} at step {int(state.step)} '
                 f'(round {data_state["round"]})')
  else:
    state, data_state = trainer.init_state(), {'round': 0}
  if is_main:
    rundir.write_text(rundir.inside(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
  prompts_per_round = cfg.data.batch_size // g.group_size
  rounds = cfg.train.steps // g.updates_per_batch
  if is_main:
    tqdm.write(f'lm: grpo: {trainer.trainable_summary()}; {len(records):,} prompts'
               f'{f" (+{len(heldout)} held out)" if heldout else ""}, '
               f'{prompts_per_round} per round x {g.group_size} completions, {rounds} rounds x '
               f'{g.updates_per_batch} steps; environment {env_name}')
  writer = MetricWriter(workdir, cfg, enabled=is_main)
  summary = {}
  # The round sampled but not yet trained on when the checkpoint was written (overlap only). One
  # whose environment failed is replayed (skipped again) with on_error=skip; with stop it is
  # sampled again, from the checkpoint's weights, so that a fixed environment lets the run go on.
  pending = data_state.get('pending')
  if pending is not None and 'error' in pending and g.on_error == 'stop':
    pending = None

  def sample_round(r, params) -> dict:
    """Round r's episodes and rewards, JSON-ready (a checkpoint carries the pending one); an
    environment's failure as {'round': r, 'error': its one line}."""
    t0 = time.perf_counter()
    chosen = round_prompts(len(records), prompts_per_round, cfg.train.seed, r)
    ids_of = [i for i in chosen for _ in range(g.group_size)]  # G copies, grouped
    chosen_records = [records[i] for i in ids_of]
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), r)
    params = sampler.place(params)  # once per round, not per turn
    try:
      got = run_episodes(sampler, env, env_name, params, [encode_prompt(x) for x in chosen_records],
                         chosen_records, ids_of, rng, timeout_s=g.env_timeout_s)
      reward, parts = environments.score(env_name, env, got.texts, chosen_records, ids_of,
                                         g.env_timeout_s)
    except environments.EnvironmentFailure as e:
      return {'round': r, 'error': str(e), 'sample_s': time.perf_counter() - t0}
    return {'round': r, 'prompts': [[int(i) for i in p] for p in got.prompts],
            'segments': [[[[int(i) for i in ids], bool(trained)] for ids, trained in s]
                         for s in got.segments],
            'logps': got.logps, 'calls': [int(n) for n in got.calls],
            'reward': [float(x) for x in reward],
            'parts': {k: [float(x) for x in v] for k, v in parts.items()},
            'sample_s': time.perf_counter() - t0}

  def evaluate(step, r):
    t = time.perf_counter()
    value = heldout_reward(sampler, env, env_name, state.params, heldout, encode_prompt, cfg)
    writer.write(step, {'heldout_reward': value, 'heldout_s': time.perf_counter() - t,
                        'elapsed_s': time.perf_counter() - started})
    summary['heldout_reward'] = value
    if is_main:
      tqdm.write(f'held-out reward {value:.3f} over {len(heldout)} prompts after round {r}')

  def failed(e, r, step, *, evaluation=False):
    """An environment's failure: the round (or the held-out evaluation) skipped with one line
    (grpo.on_error=skip; train.max_bad_steps rounds in a row stop the run), or the run stopped
    with a checkpoint of the rounds done (and the round sampling in the overlap thread)."""
    nonlocal skipped
    if g.on_error == 'skip' and evaluation:
      if is_main:
        tqdm.write(f'lm: grpo: held-out evaluation after round {r + 1} skipped: {e}')
      return
    if g.on_error == 'skip':
      skipped += 1
      streak[0] += 1
      if is_main:
        tqdm.write(f'lm: grpo: round {r + 1} skipped: {e}')
      if streak[0] < cfg.train.max_bad_steps:
        return
      e = environments.EnvironmentFailure(f'{streak[0]} rounds in a row skipped (train.max_bad_steps)'
                                          f'; the last: {e}')
    if step > (ckpt.latest_step() or 0):
      extra = {'pending': future.result()} if future is not None else {}
      ckpt.save(step, state, {**data_state, **extra}, force=True)
      ckpt.wait()
    raise e

  streak = [0]
  r = int(data_state['round'])
  executor = ThreadPoolExecutor(1, thread_name_prefix='grpo-sampler') if g.overlap else None
  future = None
  bar = tqdm(total=rounds, initial=int(state.step) // g.updates_per_batch,
             disable=not (progress and is_main), desc='grpo')
  stop = preemption.StopSignal(cfg.train.grace_seconds)
  try:
    with stop:
      if heldout and g.eval_every and int(state.step) == 0:
        try:
          evaluate(0, 0)
        except environments.EnvironmentFailure as e:
          failed(e, -1, 0, evaluation=True)
      while int(state.step) < cfg.train.steps:
        t0 = time.perf_counter()
        if future is not None:
          sampled = future.result()
        elif pending is not None and pending['round'] == r:
          sampled = pending
        else:
          sampled = sample_round(r, state.params)
        wait_s = time.perf_counter() - t0  # the trainer idle, waiting for this round's samples
        future, pending = None, None
        if 'error' in sampled:
          r += 1
          data_state = {'round': r, 'sampler_seed': cfg.train.seed, 'skipped': skipped + 1}
          failed(environments.EnvironmentFailure(sampled['error']), r - 1, int(state.step))
          continue
        streak[0] = 0
        if executor is not None and int(state.step) + g.updates_per_batch < cfg.train.steps:
          # Round r + 1 samples (and is scored) from these weights while round r trains: one
          # round off-policy. A copy, because the train step donates (frees) the weights it is given.
          snapshot = jax.block_until_ready(jax.tree.map(jnp.copy, state.params))
          future = executor.submit(sample_round, r + 1, snapshot)
        reward = np.asarray(sampled['reward'], np.float64)
        rows = episode_rows(sampled['prompts'], sampled['segments'], tokenizer.pad_id,
                            cfg.data.seq_len)
        rows['advantages'] = group_advantages(reward, g.group_size, g.scale_rewards)
        rows['old_logps'] = sampling_log_probs(rows['weights'], sampled['logps'])
        batch = trainer.global_batch(rows)
        t1 = time.perf_counter()
        for _ in range(g.updates_per_batch):
          state, metrics = trainer.step(state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        t2 = time.perf_counter()
        if metrics['bad_streak'] >= cfg.train.max_bad_steps:
          raise Diverged(f'round {r}: {int(metrics["bad_streak"])} consecutive steps were skipped '
                         '(non-finite loss or gradient); lower optimizer.lr')
        lengths = rows['weights'].sum(axis=1).astype(np.float64)  # the model's own tokens
        sample_s = sampled['sample_s']
        metrics.update(
            reward_mean=float(reward.mean()), reward_std=float(reward.std()),
            completion_length=float(lengths.mean()), sample_s=sample_s, train_s=t2 - t1,
            wait_s=wait_s, overlap_s=max(0.0, sample_s - wait_s), round_s=t2 - t0,
            elapsed_s=t2 - started,
            groups_with_signal=float(np.mean(reward.reshape(-1, g.group_size).std(axis=1) > 0)),
            **({'tool_calls': float(np.mean(sampled['calls']))} if env.max_turns > 1 else {}),
            **{f'reward/{n}': float(np.mean(v)) for n, v in sampled['parts'].items()})
        step = int(state.step)
        writer.write(step, metrics)
        summary.update(metrics)
        r += 1
        done = step >= cfg.train.steps
        if is_main and (r % max(1, cfg.train.log_every // g.updates_per_batch) == 0 or done):
          tqdm.write(f'round {r}/{rounds + skipped} (step {step}): reward {metrics["reward_mean"]:.3f} '
                     f'+- {metrics["reward_std"]:.3f}, loss {metrics["loss"]:.4f}, kl '
                     f'{metrics["kl"]:.4f}, clip {metrics["clip_fraction"]:.3f}, length '
                     f'{metrics["completion_length"]:.1f}; sample {sample_s:.1f}s (overlapped '
                     f'{metrics["overlap_s"]:.1f}s), train {t2 - t1:.1f}s, round {t2 - t0:.1f}s')
        bar.update(1)
        data_state = {'round': r, 'sampler_seed': cfg.train.seed, 'skipped': skipped}
        if heldout and g.eval_every and (step // g.updates_per_batch % g.eval_every == 0 or done):
          try:
            evaluate(step, r)
          except environments.EnvironmentFailure as e:
            failed(e, r - 1, step, evaluation=True)
        save = step % cfg.train.checkpoint_every == 0 or done
        preempted = stop.should_stop() and not done
        if future is not None and (save or preempted):
          # Round r + 1 was sampled from weights the checkpoint does not hold: it goes along,
          # so a resumed run trains on exactly those samples.
          data_state['pending'] = future.result()
        if save or preempted:  # once: a preemption at a checkpoint step saved it twice
          ckpt.save(step, state, data_state, force=preempted)
        if preempted:
          ckpt.wait()
          raise Preempted(f'{stop.name} at step {step}: checkpoint written to {ckpt.directory}; '
                          'run the same command to resume')
  except BaseException:
    writer.close(failed=True)
    raise
  finally:
    if executor is not None:
      executor.shutdown(wait=True, cancel_futures=True)
    bar.close()
    ckpt.close()
  summary.update(step=int(state.step), unigram_perplexity=float('nan'))
  if is_main:
    rundir.write_text(rundir.inside(workdir, 'summary.json'), json.dumps(summary, indent=2))
  writer.close(summary)
  return summary
