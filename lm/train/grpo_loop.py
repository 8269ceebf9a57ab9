"""GRPO with verifiable rewards: sample -> score -> K optimizer steps, through the one train step.

A round takes batch_size / G prompts (a seeded reshuffle per epoch of `grpo.prompts`), samples G
completions of each from the current policy with the rollout engine (lm/eval/rollout.py: the G
copies share one prefill), scores them with the reward functions `grpo.rewards` names
(lm/eval/rewards.py), normalises the rewards within each group into advantages, keeps the
sampling policy's log-probs of the completion tokens as the engine recorded them (equal to the
trainer's forward on the same weights: tests/eval/test_rollout.py), and runs `grpo.updates_per_batch` steps of the ordinary train step with the
`grpo` objective (lm/train/objectives.py) on those rows. The step is the same one every mode uses.

Everything a round draws derives from (train.seed, round): the prompts from the epoch's
permutation and the sampler's key from fold_in(key(seed), round), so the checkpoint's record of
the round (with the optimizer state) resumes the exact sequence an uninterrupted run would see.

With `grpo.overlap`, round r + 1 samples (in a thread, from a copy of the weights) while round r
trains: one round off-policy, which the clipped importance ratio pi / pi_old corrects, pi_old
being the sampling weights' log-probs. The first round samples before training, as without
overlap. A checkpoint carries the sampled but untrained round (`pending` in its data state), so a
resumed run trains on exactly the samples an uninterrupted one would. Each round logs sample_s
(sampling and scoring), train_s, wait_s (the trainer idle, waiting for samples), overlap_s
(sampling hidden behind training: sample_s - wait_s) and round_s.

This module sits with lm/train/loop.py above lm/eval (it imports the generator and rewards).
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
from lm.eval import generate as generate_lib
from lm.eval import rollout
from lm.eval import rewards as rewards_lib
from lm.io import pretrained
from lm.train import objectives, preemption, rundir, trackers
from lm.train.loop import Trainer, make_checkpointer, restore
from lm.train.metrics import MetricWriter
from lm.train.objectives import token_log_probs


def check_config(cfg):
  """Bad GRPO settings fail here, in one line, before any data is read or anything compiles.
  Returns the resolved reward functions."""
  g = cfg.grpo
  rewards = rewards_lib.resolve(g.rewards)
  if g.reward_weights and len(g.reward_weights) != len(rewards):
    raise ConfigError(f'grpo.reward_weights has {len(g.reward_weights)} entries for '
                      f'{len(rewards)} rewards; give one weight per reward or ()')
  if g.group_size < 2 or cfg.data.batch_size % g.group_size:
    raise ConfigError(f'grpo.group_size={g.group_size} must be at least 2 and divide '
                      f'data.batch_size={cfg.data.batch_size} (batch_size / group_size prompts per round)')
  if g.updates_per_batch < 1 or cfg.train.steps % g.updates_per_batch:
    raise ConfigError(f'train.steps={cfg.train.steps} must be a multiple of '
                      f'grpo.updates_per_batch={g.updates_per_batch}')
  if g.max_new_tokens + 2 > cfg.data.seq_len:
    raise ConfigError(f'grpo.max_new_tokens={g.max_new_tokens} leaves no room for a prompt in '
                      f'data.seq_len={cfg.data.seq_len}; raise data.seq_len')
  if not g.prompts or not os.path.isfile(g.prompts):
    raise ConfigError(f'grpo.prompts={g.prompts!r} is not a file; name a .jsonl/.json of prompt '
                      'records, e.g. ../shared/data/gsm8k/train.jsonl')
  objectives.from_config(cfg)
  return rewards


def load_prompts(cfg) -> list[dict]:
  records = list(sources.load(cfg.grpo.prompts).items)
  if not records:
    raise DataError(f'{cfg.grpo.prompts}: no records')
  try:
    cfg.grpo.prompt_format.format(**records[0])
  except (KeyError, IndexError, AttributeError, TypeError) as e:
    raise ConfigError(f'grpo.prompt_format={cfg.grpo.prompt_format!r} does not fit the records '
                      f'of {cfg.grpo.prompts} (fields {sorted(records[0])}): {e!r}') from None
  return records


def prompt_encoder(cfg, tokenizer):
  """(fn(record) -> prompt ids, end-of-turn ids): `grpo.prompt_format` filled from the record, as
  plain text, or with `grpo.chat_template` set as the user turn of a conversation in that template
  (the mechanism of `lm generate --chat` and data.chat_template), ending in the assistant header."""
  g = cfg.grpo
  if not g.chat_template:
    return (lambda record: tokenizer.encode(g.prompt_format.format(**record),
                                            bos=tokenizer.add_bos)), ()
  try:
    encoder = chat.ChatEncoder(chat.get_template(g.chat_template, tokenizer), tokenizer)
  except DataError as e:
    raise ConfigError(f'grpo.chat_template={g.chat_template!r}: {e}') from None
  return (lambda record: encoder.encode_prompt(
      [{'role': 'user', 'content': g.prompt_format.format(**record)}]).tolist()), tuple(encoder.stop_ids())


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
  B = len(prompts)
  rows = {k: np.zeros((B, seq_len), np.float32 if k == 'weights' else np.int32)
          for k in ('tokens', 'targets', 'weights', 'segment_ids', 'positions')}
  rows['tokens'][:], rows['targets'][:] = pad_id, pad_id
  for b, (p, c, e) in enumerate(zip(prompts, completions, ends)):
    c = list(c) + ([] if e is None else [e])
    p = list(p)[-(seq_len + 1 - len(c)):]
    ids = np.asarray(p + c, np.int32)
    n = len(ids) - 1
    rows['tokens'][b, :n], rows['targets'][b, :n] = ids[:-1], ids[1:]
    rows['weights'][b, len(p) - 1:n] = 1.0
    rows['segment_ids'][b, :n] = 1
    rows['positions'][b, :n] = np.arange(n)
  return rows


def sampling_log_probs(weights_BT: np.ndarray, logps: list) -> np.ndarray:
  """[B, T] float32: each row's sampled log-probs at its weighted (completion and end) tokens,
  in order; completion_rows weighs exactly those."""
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

  def __init__(self, trainer, tokenizer, end_ids: tuple = ()):
    """`end_ids`: tokens besides eos that end a completion and are learned as its end (a chat
    template's end of turn)."""
    cfg, g = trainer.cfg, trainer.cfg.grpo
    self.trainer, self.tokenizer = trainer, tokenizer
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
        cache_sharding=rollout.cache_sharding(trainer.spec.cfg, trainer.mesh, tuple(cfg.mesh.rules)))
    spec = trainer.spec
    self.log_probs = jax.jit(lambda params, batch: token_log_probs(spec.bind(params), batch),
                             in_shardings=(trainer.shardings.params, trainer.batch_sharding))

  def __call__(self, params, prompt_ids: list[list[int]], rng):
    return tuple(self.sample(params, prompt_ids, rng))[:4]

  def sample(self, params, prompt_ids: list[list[int]], rng) -> Rollouts:
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


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) GRPO; returns the final metrics (`lm train` with train.objective=grpo)."""
  pretrained.resolve_config(cfg)  # as lm.train.loop.train: the shape and tokenizer of init_from
  reward_fns = check_config(cfg)
  trackers.names(cfg)  # an unknown or uninstalled tracker, before any work
  with rundir.removed_on_user_error(os.path.abspath(workdir), is_main=jax.process_index() == 0):
    return _train(cfg, rundir.prepare(workdir), reward_fns, progress=progress)


def _train(cfg, workdir, reward_fns, *, progress=True) -> dict:
  g = cfg.grpo
  is_main = jax.process_index() == 0
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  pipeline.check_vocab(tokenizer, cfg.model.vocab_size)
  records = load_prompts(cfg)
  weights = list(g.reward_weights) or [1.0] * len(reward_fns)
  encode_prompt, end_ids = prompt_encoder(cfg, tokenizer)
  trainer = Trainer(cfg)
  sampler = Sampler(trainer, tokenizer, end_ids)
  ckpt = make_checkpointer(cfg, workdir, trainer.labels)
  if ckpt.latest_step() is not None:
    state, data_state = restore(trainer, ckpt)
    if data_state.get('round') != int(state.step) // g.updates_per_batch:
      raise DataError(f'{ckpt.directory}: checkpoint step {int(state.step)} and sampler round '
                      f'{data_state.get("round")} disagree; the checkpoint is not from this GRPO run')
    if is_main:
      tqdm.write(f'resumed from {ckpt.directory} at step {int(state.step)} '
                 f'(round {data_state["round"]})')
  else:
    state, data_state = trainer.init_state(), {}
  if is_main:
    rundir.write_text(rundir.inside(workdir, 'config.json'), cfg.to_json_best_effort(indent=2))
  prompts_per_round = cfg.data.batch_size // g.group_size
  rounds = cfg.train.steps // g.updates_per_batch
  if is_main:
    tqdm.write(f'lm: grpo: {trainer.trainable_summary()}; {len(records):,} prompts, '
               f'{prompts_per_round} per round x {g.group_size} completions, {rounds} rounds x '
               f'{g.updates_per_batch} steps; rewards {", ".join(n for n, _ in reward_fns)}')
  writer = MetricWriter(workdir, cfg, enabled=is_main)
  summary = {}
  start = int(state.step) // g.updates_per_batch
  # The round sampled but not yet trained on when the checkpoint was written (overlap only).
  pending = data_state.get('pending')

  def sample_round(r, params) -> dict:
    """Round r's samples and rewards, JSON-ready (a checkpoint carries the pending one)."""
    t0 = time.perf_counter()
    chosen = round_prompts(len(records), prompts_per_round, cfg.train.seed, r)
    ids = [encode_prompt(records[i]) for i in chosen for _ in range(g.group_size)]  # G copies, grouped
    rng = jax.random.fold_in(jax.random.key(cfg.train.seed), r)
    got = sampler.sample(params, ids, rng)
    ids_of = [chosen[b // g.group_size] for b in range(len(got.texts))]
    scores = rewards_lib.score(reward_fns, got.texts, [records[i] for i in ids_of], ids_of)
    return {'round': r, 'prompts': got.prompts, 'completions': got.completions, 'ends': got.ends,
            'logps': [x.tolist() for x in got.logps], 'scores': scores.tolist(),
            'sample_s': time.perf_counter() - t0}

  executor = ThreadPoolExecutor(1, thread_name_prefix='grpo-sampler') if g.overlap else None
  future = None
  bar = tqdm(total=rounds, initial=start, disable=not (progress and is_main), desc='grpo')
  stop = preemption.StopSignal(cfg.train.grace_seconds)
  try:
    with stop:
      for r in range(start, rounds):
        t0 = time.perf_counter()
        if future is not None:
          sampled = future.result()
        elif pending is not None and pending['round'] == r:
          sampled = pending
        else:
          sampled = sample_round(r, state.params)
        wait_s = time.perf_counter() - t0  # the trainer idle, waiting for this round's samples
        future = None
        if executor is not None and r + 1 < rounds:
          # Round r + 1 samples from these weights while round r trains: one round off-policy.
          # A copy, because the train step donates (frees) the weights it is given.
          snapshot = jax.block_until_ready(jax.tree.map(jnp.copy, state.params))
          future = executor.submit(sample_round, r + 1, snapshot)
        scores = np.asarray(sampled['scores'], np.float64).reshape(-1, len(reward_fns))
        reward = scores @ np.asarray(weights, np.float64)
        rows = completion_rows(sampled['prompts'], sampled['completions'], sampled['ends'],
                               tokenizer.pad_id, cfg.data.seq_len)
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
        lengths = np.array([len(c) for c in sampled['completions']], np.float64)
        sample_s = sampled['sample_s']
        metrics.update(
            reward_mean=float(reward.mean()), reward_std=float(reward.std()),
            completion_length=float(lengths.mean()), sample_s=sample_s, train_s=t2 - t1,
            wait_s=wait_s, overlap_s=max(0.0, sample_s - wait_s), round_s=t2 - t0,
            groups_with_signal=float(np.mean(reward.reshape(-1, g.group_size).std(axis=1) > 0)),
            **{f'reward/{n.rsplit(".", 1)[-1]}': float(s) for (n, _), s in
               zip(reward_fns, scores.mean(axis=0))})
        step = int(state.step)
        writer.write(step, metrics)
        summary.update(metrics)
        if is_main and ((r + 1) % max(1, cfg.train.log_every // g.updates_per_batch) == 0
                        or r + 1 == rounds):
          tqdm.write(f'round {r + 1}/{rounds} (step {step}): reward {metrics["reward_mean"]:.3f} '
                     f'+- {metrics["reward_std"]:.3f}, loss {metrics["loss"]:.4f}, kl '
                     f'{metrics["kl"]:.4f}, clip {metrics["clip_fraction"]:.3f}, length '
                     f'{metrics["completion_length"]:.1f}; sample {sample_s:.1f}s (overlapped '
                     f'{metrics["overlap_s"]:.1f}s), train {t2 - t1:.1f}s, round {t2 - t0:.1f}s')
        bar.update(1)
        data_state = {'round': r + 1, 'sampler_seed': cfg.train.seed}
        save = step % cfg.train.checkpoint_every == 0 or r + 1 == rounds
        preempted = stop.should_stop() and r + 1 < rounds
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

