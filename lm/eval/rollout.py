"""The rollout engine: continuous batching of sampled completions over a slot cache, shared by
`lm generate`, `lm eval` (through lm/eval/generate.py's Generator) and GRPO's sampler.

A run takes requests (a prompt, how many samples it wants, its own stop sequences) and keeps
B decoding slots busy: when a sample ends (its eos, one of its stop sequences, or
max_new_tokens), its slot takes the next waiting sample at once instead of idling until the
whole batch is done.

The cache is the model's own (lm.model.transformer.init_cache, so every token-mixer kind:
attention k/v, MLA latents, gated-DeltaNet conv and recurrent state) with B rows of S slots,
used as a ring. All rows write slot `clock % S` at every decoding step; attention reads the
slots by their recorded positions and segment ids (0: empty or stale), never by slot order, so
a row's sequence may start anywhere in the ring. A sample inserted at clock c has its prompt's
cache copied into the P slots before c (P: the prompt's length bucket) and generates into the
slots from c on; S = P_max + max_new_tokens, so the ring never overwrites a live sample's slots.

Prefill: each prompt's cache (all but its last token) is computed once, for a batch of prompts
at a time, and copied into every slot that samples it (GRPO's G completions of one prompt share
it). The last prompt token is the first input of the decoding steps, so the first sampled token
comes from the same one-token step as every later one.

Sampling keys are fold_in(key, request, sample, step): a sample's tokens do not depend on which
slot it ran in or what ran beside it. Each sampled token's log-probability is recorded from the
untempered logits, as the trainer's forward computes it (lm.train.objectives.token_log_probs),
so GRPO's importance ratio can use the sampling policy's own numbers.

Compiled programs, bounded per engine: prefill and insert one per (prompt-count bucket, prompt
length bucket), both powers of two; one decoding program per ring size. `programs()` counts them.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from lm import sharding as sharding_lib
from lm.errors import UserError
from lm.model import transformer

MIN_PROMPT_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. temperature 0 is greedy; top_k 0 and top_p 1 disable those."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f'max_new_tokens={self.max_new_tokens} must be at least 1')
    # Written so that NaN fails every test (NaN compares false both ways).
    if not (0 <= self.temperature < math.inf and self.top_k >= 0 and 0 < self.top_p <= 1):
      raise UserError(f'temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}: '
                      'need a finite temperature >= 0 (0: greedy), top_k >= 0 and 0 < top_p <= 1')


def sample_logits(logits_BV, rng, sampling: Sampling):
  """Next token ids [B] from float32 logits."""
  if sampling.temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  neg_inf = jnp.finfo(logits_BV.dtype).min
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, neg_inf, logits_BV)
  if sampling.top_p < 1:
    # Keep the smallest set of most likely tokens whose probability reaches top_p: a token stays
    # if the mass strictly before it (in descending order) is below top_p.
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept = jnp.sum(before_BV < sampling.top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, kept - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, neg_inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Request:
  """`prompt` token ids (at least one); `n` samples of it share its prefill; `stop`: token
  sequences that end a sample besides the engine's eos; `max_new_tokens`: this request's limit,
  at most (and by default) the engine's."""
  prompt: tuple
  n: int = 1
  stop: tuple = ()
  max_new_tokens: int | None = None


@dataclasses.dataclass
class Completion:
  """One sample: `ids` generated before the end, `stop` the stop sequence (eos: (eos_id,)) that
  ended it or None when max_new_tokens did, `logps` log p of each of ids + stop under the model
  (float32, untempered)."""
  ids: list
  stop: tuple | None
  logps: np.ndarray


def cache_sharding(model_cfg, mesh, rules):
  """fn(B, S) -> shardings of the cache's per-layer states on `mesh`, from their logical axes
  (rows like the batch, kv heads like the tensor axis)."""
  axes = transformer.cache_logical_axes(model_cfg)['layers']

  def shardings(B, S):
    shapes = jax.eval_shape(lambda: transformer.init_cache(model_cfg, B, S))['layers']

    def one(shape, names):
      spec = sharding_lib.logical_to_mesh_spec(names, rules)
      return NamedSharding(mesh, sharding_lib.fit_spec(spec, shape.shape, mesh))
    return {stack: {k: one(shapes[stack][k], axes[stack][k]) for k in shapes[stack]}
            for stack in shapes}
  return shardings


def _pow2(n: int, minimum: int = 1) -> int:
  return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _stop_hit(out_BN, n_B, stops_BML):
  """[B] index of the first stop sequence the first n_B generated tokens end with, else -1.
  stops_BML: M sequences per row, right-aligned in L with -1 before them (an all -1 row: none)."""
  B, N = out_BN.shape
  L = stops_BML.shape[-1]
  idx_BL = n_B[:, None] - L + jnp.arange(L)[None]
  window_BL = jnp.take_along_axis(out_BN, jnp.clip(idx_BL, 0, N - 1), axis=1)
  free_BML = stops_BML < 0
  match_BML = free_BML | ((window_BL[:, None] == stops_BML) & (idx_BL[:, None] >= 0))
  valid_BM = ~jnp.all(free_BML, axis=-1)
  hit_BM = jnp.all(match_BML, axis=-1) & valid_BM
  first_B = jnp.argmax(hit_BM, axis=-1)
  return jnp.where(jnp.any(hit_BM, axis=-1), first_B, -1).astype(jnp.int32)


class RolloutEngine:
  """Samples completions for one model; `run(params, requests, key)`.

  `slots`: concurrent sequences (a multiple of the mesh's data-parallel size when sharded);
  `prefill_batch`: most prompts prefilled in one call; `cache_sharding(B, S)`: shardings of the
  cache's per-layer states (lm/eval/generate.py's Generator gives them on a mesh)."""

  def __init__(self, spec, sampling: Sampling, *, eos_id: int | None, pad_id: int = 0,
               slots: int = 32, prefill_batch: int = 8, cache_sharding=None):
    self.spec, self.sampling = spec, sampling
    self.eos_id, self.pad_id = eos_id, pad_id
    self.slots, self.prefill_batch = slots, prefill_batch
    self.cache_sharding = cache_sharding
    self._length_axis = {stack: {k: (names.index('length') if 'length' in names else None)
                                 for k, names in arrays.items()}
                         for stack, arrays in transformer.cache_logical_axes(spec.cfg)['layers'].items()}
    self._prefill = jax.jit(self._prefill_fn)
    self._insert = jax.jit(self._insert_fn, donate_argnums=0)
    self._decode = jax.jit(self._decode_fn, donate_argnums=1)
    self._new_cache = jax.jit(self._new_cache_fn, static_argnums=(0, 1))

  def programs(self) -> int:
    """How many programs this engine has compiled."""
    return sum(f._cache_size() for f in (self._prefill, self._insert, self._decode, self._new_cache))  # pylint: disable=protected-access

  # Device programs -----------------------------------------------------------------------------

  def _constrain(self, layers, B, S):
    if self.cache_sharding is None:
      return layers
    return jax.lax.with_sharding_constraint(layers, self.cache_sharding(B, S))

  def _new_cache_fn(self, B, S):
    cache = transformer.init_cache(self.spec.cfg, B, S)
    return {**cache, 'layers': self._constrain(cache['layers'], B, S)}

  def _prefill_fn(self, params, tokens_QP, lengths_Q):
    """The cache of Q left-padded prompts (lengths may be 0), laid out in P slots."""
    Q, P = tokens_QP.shape
    cache = transformer.init_cache(self.spec.cfg, Q, P)
    slot_P = jnp.arange(P, dtype=jnp.int32)
    start_Q = P - lengths_Q
    real_QP = slot_P[None] >= start_Q[:, None]
    positions_QP = jnp.where(real_QP, slot_P[None] - start_Q[:, None], 0)
    segments_QP = real_QP.astype(jnp.int32)
    cache = {**cache, 'positions': positions_QP, 'segment_ids': segments_QP}
    # hidden_states, not the model call: the prefill needs the cache, not the logits.
    _, layers = self.spec.bind(params).hidden_states(tokens_QP, positions_QP, segments_QP, cache)
    return {**cache, 'layers': layers}

  def _insert_fn(self, cache, states, clock, src_B, take_B):
    """The cache with prefilled prompt `src_B[b]` of `states` copied into every row b where
    take_B: its P slots end just before slot `clock` of the ring, the row's other slots emptied
    (segment id 0); recurrent states (no slot axis) replaced."""
    S = cache['positions'].shape[1]
    P = states['positions'].shape[1]

    layers = {stack: {k: self._place_layer(cache['layers'][stack][k], states['layers'][stack][k],
                                           self._length_axis[stack][k], src_B, take_B, clock, S, P)
                      for k in cache['layers'][stack]}
              for stack in cache['layers']}
    row = lambda ring, prompt: self._place_layer(ring, prompt, 1, src_B, take_B, clock, S, P, 0)
    return {**cache, 'layers': layers, 'positions': row(cache['positions'], states['positions']),
            'segment_ids': row(cache['segment_ids'], states['segment_ids'])}

  @staticmethod
  def _place_layer(ring, prompt, length_axis, src_B, take_B, clock, S, P, batch_axis=1):
    """`ring` [.., B(batch_axis), S(length_axis), ..] with rows b where take_B replaced by
    prompt row src_B[b] ([.., Q, P, ..]), its P slots rolled to end before slot `clock`."""
    rows = jnp.take(prompt, src_B, axis=batch_axis)
    if length_axis is not None:
      pad = [(0, 0)] * rows.ndim
      pad[length_axis] = (0, S - P)
      rows = jnp.roll(jnp.pad(rows, pad), clock - P, axis=length_axis)
    shape = [1] * ring.ndim
    shape[batch_axis] = -1
    return jnp.where(take_B.reshape(shape), rows.astype(ring.dtype), ring)

  def _decode_fn(self, params, cache, clock, slot, key, stops_BML, max_steps, break_on_finish):
    """Up to `max_steps` decoding steps of every active slot; stops early when none is active,
    or (break_on_finish) once a sample has ended, so the host can refill its slot."""
    model = self.spec.bind(params)
    sampling = self.sampling
    N = slot['out'].shape[1]
    S = cache['positions'].shape[1]
    B = slot['cur'].shape[0]
    rows_B = jnp.arange(B)

    def draw(logits_V, req, sample, n):
      k = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, req), sample), n)
      return sample_logits(logits_V[None], k, sampling)[0]

    def cond(carry):
      step, _, _, slot, finished = carry
      return (step < max_steps) & jnp.any(slot['active']) & ~(break_on_finish & finished)

    def body(carry):
      step, clock, cache, slot, finished = carry
      active_B = slot['active']
      pos_B1, seg_B1 = slot['pos'][:, None], active_B.astype(jnp.int32)[:, None]
      put = lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new, clock, axis=1)
      cache = {**cache, 'index': clock, 'positions': put(cache['positions'], pos_B1),
               'segment_ids': put(cache['segment_ids'], seg_B1)}
      logits_B1V, cache = model(slot['cur'][:, None], pos_B1, seg_B1, cache)
      logits_BV = logits_B1V[:, 0]
      next_B = jax.vmap(draw)(logits_BV, slot['req'], slot['sample'], slot['n'])
      logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), next_B[:, None], 1)[:, 0]
      n_B = slot['n']
      at = jnp.minimum(n_B, N - 1)
      out = slot['out'].at[rows_B, at].set(jnp.where(active_B, next_B, slot['out'][rows_B, at]))
      logp = slot['logp'].at[rows_B, at].set(jnp.where(active_B, logp_B, slot['logp'][rows_B, at]))
      n_B = n_B + active_B
      hit_B = jnp.where(active_B, _stop_hit(out, n_B, stops_BML), slot['hit'])
      done_B = active_B & ((hit_B >= 0) | (n_B >= slot['limit']))
      slot = {**slot, 'cur': jnp.where(active_B, next_B, slot['cur']), 'pos': slot['pos'] + active_B,
              'n': n_B, 'out': out, 'logp': logp, 'hit': hit_B, 'active': active_B & ~done_B}
      return step + 1, (clock + 1) % S, cache, slot, finished | jnp.any(done_B)

    carry = (jnp.int32(0), clock, cache, slot, jnp.bool_(False))
    _, clock, cache, slot, _ = jax.lax.while_loop(cond, body, carry)
    return cache, clock, slot

  # The host loop -------------------------------------------------------------------------------

  def run(self, params, requests: list, key, *, on_done=None) -> list:
    """[[Completion] * request.n per request]. `on_done(i)`: called when request i is complete."""
    N = self.sampling.max_new_tokens
    B = self.slots
    for i, r in enumerate(requests):
      if not r.prompt or r.n < 1 or (r.max_new_tokens is not None and r.max_new_tokens < 1):
        raise UserError(f'rollout request {i}: needs a prompt of at least one token, n >= 1 and '
                        f'max_new_tokens >= 1 (got {len(r.prompt)} tokens, n={r.n}, '
                        f'max_new_tokens={r.max_new_tokens})')
    stops = [self._stops(r) for r in requests]
    M = _pow2(max([len(s) for s in stops] + [1]))
    L = _pow2(max([len(x) for s in stops for x in s] + [1]))
    buckets = [_pow2(len(r.prompt) - 1, MIN_PROMPT_BUCKET) for r in requests]
    S = max(buckets, default=MIN_PROMPT_BUCKET) + N
    cache = self._new_cache(B, S)
    clock = jnp.int32(0)
    slot = {'cur': np.full(B, self.pad_id, np.int32), 'pos': np.zeros(B, np.int32),
            'n': np.zeros(B, np.int32), 'limit': np.full(B, N, np.int32),
            'active': np.zeros(B, bool), 'req': np.zeros(B, np.int32),
            'sample': np.zeros(B, np.int32), 'hit': np.full(B, -1, np.int32),
            'out': np.full((B, N), self.pad_id, np.int32), 'logp': np.zeros((B, N), np.float32)}
    stops_BML = np.full((B, M, L), -1, np.int32)
    queue = [(i, s) for i, r in enumerate(requests) for s in range(r.n)]
    queue.reverse()  # pop() from the end takes them in order
    results = [[None] * r.n for r in requests]
    # Requests with the same prompt (a GRPO group given as n = 1 requests) share one prefill too.
    remaining: dict = {}  # prompt -> samples not yet placed
    for r in requests:
      remaining[r.prompt] = remaining.get(r.prompt, 0) + r.n
    prefilled: dict = {}  # prompt -> (states of its prefill batch, row)
    while queue or slot['active'].any():
      free = np.flatnonzero(~slot['active'])
      placed = []
      while queue and len(placed) < len(free):
        placed.append(queue.pop())
      if placed:
        self._prefill_missing([i for i, _ in placed], requests, buckets, prefilled, params)
        by_states: dict = {}
        for b, (i, s) in zip(free, placed):
          states, row = prefilled[requests[i].prompt]
          by_states.setdefault(id(states), (states, []))[1].append((b, row))
          prompt = requests[i].prompt
          slot['cur'][b], slot['pos'][b], slot['n'][b] = prompt[-1], len(prompt) - 1, 0
          slot['limit'][b] = min(N, requests[i].max_new_tokens or N)
          slot['active'][b], slot['req'][b], slot['sample'][b], slot['hit'][b] = True, i, s, -1
          slot['out'][b], slot['logp'][b] = self.pad_id, 0.0
          stops_BML[b] = -1
          for m, seq in enumerate(stops[i]):
            stops_BML[b, m, L - len(seq):] = seq
        for states, pairs in by_states.values():
          src, take = np.zeros(B, np.int32), np.zeros(B, bool)
          for b, row in pairs:
            src[b], take[b] = row, True
          cache = self._insert(cache, states, clock, src, take)
        for i, _ in placed:
          prompt = requests[i].prompt
          remaining[prompt] -= 1
          if remaining[prompt] == 0:
            del prefilled[prompt]  # every sample placed: its prefill is no longer needed
      was_active = slot['active'].copy()
      cache, clock, new = self._decode(params, cache, clock, slot, key, stops_BML,
                                       np.int32(N), np.bool_(bool(queue)))
      slot = {k: np.array(v) for k, v in jax.device_get(new).items()}
      for b in np.flatnonzero(was_active & ~slot['active']):
        i, s, n, hit = int(slot['req'][b]), int(slot['sample'][b]), int(slot['n'][b]), int(slot['hit'][b])
        stop = stops[i][hit] if hit >= 0 else None
        cut = n - (len(stop) if stop else 0)
        results[i][s] = Completion(slot['out'][b, :cut].tolist(), stop, slot['logp'][b, :n].copy())
        if on_done is not None and all(c is not None for c in results[i]):
          on_done(i)
    return results

  def _stops(self, request) -> tuple:
    eos = () if self.eos_id is None or self.eos_id < 0 else ((self.eos_id,),)
    return eos + tuple(tuple(int(t) for t in s) for s in request.stop if s and tuple(s) not in eos)

  def _prefill_missing(self, indices, requests, buckets, prefilled, params):
    """Prefills the prompts of the requests among `indices` not yet prefilled, by length
    bucket, at most `prefill_batch` at a time."""
    todo: dict = {}
    for i in {requests[i].prompt: i for i in indices}.values():
      if requests[i].prompt not in prefilled:
        todo.setdefault(buckets[i], []).append(i)
    for P, group in todo.items():
      for start in range(0, len(group), self.prefill_batch):
        chunk = group[start:start + self.prefill_batch]
        Q = _pow2(len(chunk))
        tokens = np.full((Q, P), self.pad_id, np.int32)
        lengths = np.zeros(Q, np.int32)
        for q, i in enumerate(chunk):
          body = requests[i].prompt[:-1]
          if body:
            tokens[q, P - len(body):] = body
          lengths[q] = len(body)
        states = self._prefill(params, tokens, lengths)
        for q, i in enumerate(chunk):
          prefilled[requests[i].prompt] = (states, q)
