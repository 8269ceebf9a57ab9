"""The decoder stack: which parts each layer is made of, and how the layers run.

A layer is a residual block around two parts: a token mixer (softmax attention, gated DeltaNet,
...) and a channel mixer (a dense MLP or a Mixture-of-Experts), with RMSNorms placed before
('pre': Llama), before and after ('sandwich': Gemma 2/3) or only after ('post': OLMo 2/3) each
part. `model.layer_types` names each layer's token mixer ('full', 'sliding', 'chunked' attention,
'linear' for gated DeltaNet) and `model.mlp_types` its channel mixer ('dense', 'moe').

Parameters: each kind of part is one stack over the layers that use it (`layers.attn.q.kernel`
[n_attention_layers, D, H, K], `layers.linear_attn.*` [n_linear_layers, ...]), and each norm one
stack over all layers (`layers.attn_norm.scale` [L, D]). Layers that differ only in per-layer
values (the mask kind, the RoPE table: Gemma's sliding and full layers, NoPE layers) are one kind.

Running: the sequence of layer kinds is cut into segments, each a group of layers repeated
(Qwen3.5's 3 linear : 1 full is one segment of a group of 4; DeepSeek's first dense layers and
then the MoE ones are two segments of a group of 1). A segment runs as one `lax.scan` over its
groups, with the group's layers unrolled inside the loop body, so compile time does not grow with
depth; `scans_layers` decides when stacks scan at all.
"""

from __future__ import annotations

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lm.config import global_attention_layers, layer_problem, mla_enabled, n_experts
from lm.errors import ConfigError
from lm.model import rope as rope_lib
from lm.model.layers import RMSNorm, configure_adapters

NORM_PLACEMENTS = ('pre', 'sandwich', 'post')

# part kind -> 'module:Class'; each class names its parameter stack (`stack_name`).
PARTS = {
    'attention': 'lm.model.mixers.attention:Attention',
    'global_attention': 'lm.model.mixers.attention:GlobalAttention',
    'reused_kv_attention': 'lm.model.mixers.attention:ReusedKVAttention',
    'reused_kv_global_attention': 'lm.model.mixers.attention:ReusedKVGlobalAttention',
    'gated_deltanet': 'lm.model.mixers.gated_deltanet:GatedDeltaNet',
    'mla': 'lm.model.mixers.mla:MLA',
    'mlp': 'lm.model.mixers.mlp:MLP',
    'wide_mlp': 'lm.model.mixers.mlp:WideMLP',
    'moe': 'lm.model.moe:MoE',
}

_REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# A shallow stack runs faster unrolled and compiles no slower. On CPU, at configs/bench_tiny.py's
# shape with 2/4/8/16 layers (docs/pretraining.md), the step took 328/490/825/1663 ms unrolled
# against 409/587/1046/1848 ms scanned: the scan zero-fills stacked buffers for every layer's
# residuals and moves them in and out by dynamic slices. But unrolled, compile time grows with
# depth: the first step took 4.5/5.2/8.5/11.9 s against 5.3/5.9/5.8/6.7 s scanned. Up to 4 layers
# unrolling costs no compile time, so it is the default there.
UNROLL_MAX_LAYERS = 4
MAX_GROUP = 8  # the longest repeating group a segment is looked for with


def scans_layers(cfg) -> bool:
  """Whether the layers run as lax.scans: `model.scan_layers`, or when it is None (the
  default), whether there are more than UNROLL_MAX_LAYERS of them."""
  choice = getattr(cfg, 'scan_layers', None)
  return cfg.n_layers > UNROLL_MAX_LAYERS if choice is None else bool(choice)


def part_class(kind: str):
  module, name = PARTS[kind].split(':')
  return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class Segment:
  start: int  # first layer
  period: int  # layers per group
  repeats: int  # groups


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  layer_types: tuple  # per layer: 'full' | 'sliding' | 'chunked' | 'linear'
  token: tuple  # per layer: token mixer part kind
  channel: tuple  # per layer: channel mixer part kind
  segments: tuple  # Segments covering the layers in order

  def kind(self, i: int) -> tuple:
    return self.token[i], self.channel[i]

  def stack_index(self, i: int, part: str) -> int:
    """Index of layer i in the stack of its `part` ('token' or 'channel')."""
    kinds = getattr(self, part)
    return sum(1 for j in range(i) if kinds[j] == kinds[i])


def layer_types(cfg) -> tuple:
  """Each layer's type, with () resolved: every layer 'sliding' (which is full attention when
  `sliding_window` is 0, as it has always been read)."""
  types = tuple(cfg.layer_types) or ('sliding',) * cfg.n_layers
  return types


def check(cfg) -> None:
  """One line naming an unsupported layer kind or norm placement, before any trace."""
  problem = layer_problem(cfg)
  if problem:
    raise ConfigError(problem)
  if cfg.norm_placement not in NORM_PLACEMENTS:
    raise ConfigError(f'model.norm_placement={cfg.norm_placement!r} is not supported; lm '
                      f'implements {", ".join(NORM_PLACEMENTS)}')


def layer_plan(cfg) -> LayerPlan:
  check(cfg)
  types = layer_types(cfg)
  token = tuple(_token_kind(cfg, i, t) for i, t in enumerate(types))
  default_mlp = 'moe' if n_experts(cfg) else 'dense'
  channel = tuple({'moe': 'moe', 'wide': 'wide_mlp'}.get(t, 'mlp')
                  for t in (tuple(cfg.mlp_types) or (default_mlp,) * cfg.n_layers))
  kinds = list(zip(token, channel))
  return LayerPlan(types, token, channel, tuple(segments(kinds)))


def _token_kind(cfg, i: int, layer_type: str) -> str:
  if layer_type == 'linear':
    return 'gated_deltanet'
  if mla_enabled(cfg):  # DeepSeek: every attention layer is MLA
    return 'mla'
  kind = 'global_attention' if layer_type == 'full' and global_attention_layers(cfg) else 'attention'
  if i >= cfg.n_layers - (cfg.get('kv_shared_layers') or 0):  # Gemma 4's KV-shared last layers
    kind = 'reused_kv_' + kind
  return kind


def segments(kinds: list) -> list:
  """Cuts the per-layer kinds into segments of a repeated group, greedily taking at each start
  the group (of up to MAX_GROUP layers) repeated at least twice that covers the most layers, the
  shortest on ties; a single layer where nothing repeats."""
  out, i, L = [], 0, len(kinds)
  while i < L:
    best = (1, 1, 1)  # (layers covered, period, repeats)
    for period in range(1, min(MAX_GROUP, L - i) + 1):
      group = kinds[i:i + period]
      repeats = 1
      while kinds[i + repeats * period:i + (repeats + 1) * period] == group:
        repeats += 1
      if repeats > 1 and repeats * period > best[0]:
        best = (repeats * period, period, repeats)
    out.append(Segment(i, best[1], best[2]))
    i += best[0]
  return out


def norm_names(cfg) -> tuple:
  return {'pre': ('attn_norm', 'mlp_norm'),
          'sandwich': ('attn_norm', 'attn_post_norm', 'mlp_norm', 'mlp_post_norm'),
          'post': ('attn_post_norm', 'mlp_post_norm')}[cfg.norm_placement]


# Parts every layer has besides the norms, when the model has them (Gemma 4): stack name -> class.
EVERY_LAYER_PARTS = {'per_layer_input': 'lm.model.mixers.per_layer_input:PerLayerInput',
                     'layer_scale': 'lm.model.mixers.per_layer_input:LayerScale'}


def every_layer_names(cfg) -> tuple:
  """The stacks over all layers: the norms, then Gemma 4's per-layer input and layer scale."""
  extras = (('per_layer_input',) if cfg.get('per_layer_input_dim') else ()) + (
      ('layer_scale',) if cfg.get('layer_scale') else ())
  return norm_names(cfg) + extras


def _every_layer_part(cfg, name: str, rngs):
  if name not in EVERY_LAYER_PARTS:
    return RMSNorm(cfg.d_model, cfg=cfg, rngs=rngs)
  module, cls = EVERY_LAYER_PARTS[name].split(':')
  return getattr(importlib.import_module(module), cls)(cfg, rngs=rngs)


def per_layer_values(cfg) -> dict:
  """Values scanned with the layers: {'inv_freq': [L, R/2], 'rope_factor': [L], 'rope': [L] (1:
  the layer rotates), 'mask': [L]}
  (the mask indexes lm.model.mixers.attention.mask_kinds; linear layers ignore all three). Layers
  with a narrower head than others (Gemma 4's sliding ones) have their table padded with zeros;
  each attention part takes its own width."""
  from lm.model.mixers.attention import layer_head_dim, mask_index  # pylint: disable=import-outside-toplevel
  types = layer_types(cfg)
  use_rope = tuple(cfg.rope_layers) or (1,) * cfg.n_layers
  tables = {kind: rope_lib.rope(cfg, local=kind == 'sliding', K=layer_head_dim(cfg, kind))
            for kind in set(types)}
  width = max(len(table[0]) for table in tables.values())
  pad = lambda a: np.pad(a, (0, width - len(a)))
  inv_freq = [pad(tables[t][0]) if use_rope[i] else np.zeros(width, np.float32)
              for i, t in enumerate(types)]
  return {'inv_freq': np.stack(inv_freq),
          'rope_factor': np.asarray([tables[t][1] for t in types], np.float32),
          'rope': np.asarray(use_rope, np.float32),
          'mask': np.asarray([mask_index(cfg, t) for t in types], np.int32)}


def _stacked(make, n: int, rngs):
  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
  def build(rngs):
    return make(rngs)
  return build(rngs)


@dataclasses.dataclass
class LayerContext:
  """What a part sees of its layer besides x: positions, segment ids, this layer's scanned values
  and, in decoding, the cache's shared positions/segment ids and the slot of this call's first
  token."""
  positions_BT: jax.Array
  segment_ids_BT: jax.Array | None
  layer: dict
  index: jax.Array | None = None
  cache_positions: jax.Array | None = None
  cache_segment_ids: jax.Array | None = None
  # Keys and values an attention stack leaves for the KV-shared layers (Gemma 4): {stack: (k, v)}
  shared_kv: dict = dataclasses.field(default_factory=dict)


class Stack(nnx.Module):
  """The layers: one parameter stack per part kind and per norm (see the module docstring)."""

  def __init__(self, cfg, *, rngs):
    self.plan = layer_plan(cfg)
    self.placement = cfg.norm_placement
    self.norms = every_layer_names(cfg)
    for name in self.norms:
      setattr(self, name, _stacked(lambda r, name=name: _every_layer_part(cfg, name, r),
                                   cfg.n_layers, rngs))
    # KV sharing (Gemma 4): the stacks whose keys and values later layers reuse, with their
    # (KV heads, head dim); those travel through the scans beside x (`_segment`).
    self.kv_slots = {}
    for kind in dict.fromkeys(self.plan.token):
      cls = part_class(kind)
      if getattr(cls, 'kv_source', None):  # a reusing part has its source's dims
        self.kv_slots[cls.kv_source] = cls.dims(cfg)
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    self.stacks = {}  # part kind -> stack attribute name
    for kinds in (self.plan.token, self.plan.channel):
      for kind in dict.fromkeys(kinds):
        cls = part_class(kind)
        self.stacks[kind] = cls.stack_name
        setattr(self, cls.stack_name, _stacked(lambda r, cls=cls: cls(cfg, rngs=r), kinds.count(kind), rngs))

  def parts(self, kind: str):
    return getattr(self, self.stacks[kind])

  def __call__(self, x_BTD, ctx_values: dict, per_layer: dict, caches=None, *, adapters=True,
               remat='none', scan=True):
    """x_BTD through every layer -> (x_BTD, caches: {stack name: arrays [n, ...]} or None,
    MoE router stats stacked over the MoE layers or None).

    ctx_values: positions_BT, segment_ids_BT and, in decoding, index / cache_positions /
    cache_segment_ids (LayerContext's fields). per_layer: [L, ...] values, with 'key' [L, 2]
    when adapters take dropout keys."""
    plan = self.plan
    graphdefs, states = {}, {}
    for name in self.norms:
      graphdefs[name], states[name] = nnx.split(getattr(self, name))
    for kind, name in self.stacks.items():
      graphdefs[name], states[name] = nnx.split(getattr(self, name))
    new_caches = {name: [] for name in (caches or {})}
    stats = []
    # Zeros until the first layer of each shared stack runs: [B, T or cache slots, G, K].
    B, T = x_BTD.shape[:2]
    S = T if caches is None else ctx_values['cache_positions'].shape[1]
    shared = {name: (jnp.zeros((B, S, G, K), self.compute_dtype),) * 2
              for name, (G, K) in self.kv_slots.items()}
    for seg in plan.segments:
      (x_BTD, shared), seg_caches, seg_stats = self._segment(
          seg, (x_BTD, shared), graphdefs, states, ctx_values, per_layer, caches, adapters, remat,
          scan)
      for name, value in seg_caches.items():
        new_caches[name].append(value)
      stats.extend(seg_stats)
    caches_out = None if caches is None else {
        name: jax.tree.map(lambda *a: jnp.concatenate(a), *parts) for name, parts in new_caches.items()}
    stats_out = jax.tree.map(lambda *a: jnp.concatenate(a), *stats) if stats else None
    return x_BTD, caches_out, stats_out

  def _segment(self, seg, carry, graphdefs, states, ctx_values, per_layer, caches, adapters,
               remat, scan):
    """One segment's layers on carry (x_BTD, the shared keys and values) -> (the new carry,
    the segment's caches, its MoE router stats)."""
    plan, P, r = self.plan, seg.period, seg.repeats
    layers = range(seg.start, seg.start + P)  # the first group's layers
    # Per position in the group: (token stack, channel stack) and its index among the group's
    # layers of the same stack; each stack's slice for this segment is [r, per-group count, ...].
    group = []
    counts = {}
    for i in layers:
      token, channel = (self.stacks[k] for k in plan.kind(i))
      group.append((token, counts.get(token, 0), channel, counts.get(channel, 0)))
      counts[token] = counts.get(token, 0) + 1
      counts[channel] = counts.get(channel, 0) + 1
    firsts = {}
    for i in layers:
      for part in ('token', 'channel'):
        name = self.stacks[getattr(plan, part)[i]]
        firsts.setdefault(name, plan.stack_index(i, part))

    def cut(tree, start, count):
      return jax.tree.map(lambda a: a[start:start + r * count].reshape(r, count, *a.shape[1:]), tree)

    xs = {'norms': {n: cut(states[n], seg.start, P) for n in self.norms},
          'parts': {n: cut(states[n], firsts[n], c) for n, c in counts.items()},
          'values': cut(per_layer, seg.start, P)}
    if caches is not None:
      xs['caches'] = {n: cut(caches[n], firsts[n], c) for n, c in counts.items() if n in caches}

    def one_layer(x_BTD, shared, norms, token, channel, values, cache):
      ctx = LayerContext(layer=values, shared_kv=dict(shared), **ctx_values)
      key = values.get('key')
      keys = (None, None) if key is None else jax.random.split(key)
      configure_adapters(token, adapters, keys[0])
      configure_adapters(channel, adapters, keys[1])
      h_BTD = x_BTD if self.placement == 'post' else norms['attn_norm'](x_BTD)
      h_BTD, cache = token(h_BTD, ctx, cache)
      shared = {name: ctx.shared_kv[name] for name in shared}  # an attention layer may leave its K/V
      if self.placement != 'pre':
        h_BTD = norms['attn_post_norm'](h_BTD)
      x_BTD = x_BTD + h_BTD
      if getattr(channel, 'own_norms', False):  # Gemma 4's MoE block: its branches norm x
        h_BTD, stats = channel(x_BTD, ctx, pre_norm=norms['mlp_norm'])
      else:
        h_BTD = x_BTD if self.placement == 'post' else norms['mlp_norm'](x_BTD)
        h_BTD, stats = channel(h_BTD, ctx)
      if self.placement != 'pre':
        h_BTD = norms['mlp_post_norm'](h_BTD)
      x_BTD = x_BTD + h_BTD
      if 'per_layer_input' in norms:
        configure_adapters(norms['per_layer_input'], adapters, None)
        x_BTD = x_BTD + norms['per_layer_input'](x_BTD, values['per_layer_input'])
      if 'layer_scale' in norms:
        x_BTD = norms['layer_scale'](x_BTD)
      return x_BTD, shared, cache, stats

    def group_body(carry, g):
      x_BTD, shared = carry
      take = lambda tree, j: jax.tree.map(lambda a: a[j], tree)
      caches_out = {n: [None] * c for n, c in counts.items() if 'caches' in g and n in g['caches']}
      stats = []
      for j, (token_name, tj, channel_name, cj) in enumerate(group):

        # The layer's slice of the group is taken inside the checkpoint: its residuals are then
        # the scan's own per-group inputs, which the backward scan reads in place. Taken outside,
        # each slice is a new value the forward scan stacks as a residual: a second copy of every
        # layer weight (36 GiB of QLoRA 70B's NF4 kernels and scales on one GPU).
        def layer_fn(x_BTD, shared, g, j=j, tj=tj, cj=cj, token_name=token_name,
                     channel_name=channel_name):
          norms = {n: nnx.merge(graphdefs[n], take(s, j)) for n, s in g['norms'].items()}
          token = nnx.merge(graphdefs[token_name], take(g['parts'][token_name], tj))
          channel = nnx.merge(graphdefs[channel_name], take(g['parts'][channel_name], cj))
          cache = g['caches'][token_name] if token_name in caches_out else None
          return one_layer(x_BTD, shared, norms, token, channel, take(g['values'], j),
                           None if cache is None else take(cache, tj))

        if remat != 'none' and caches is None:
          layer_fn = jax.checkpoint(layer_fn, policy=_REMAT_POLICIES[remat], prevent_cse=not scan)
        x_BTD, shared, new_cache, layer_stats = layer_fn(x_BTD, shared, g)
        if token_name in caches_out:
          caches_out[token_name][tj] = new_cache
        if layer_stats is not None:
          stats.append(layer_stats)
      stacked = lambda items: jax.tree.map(lambda *a: jnp.stack(a), *items)
      caches_out = {n: stacked(c) for n, c in caches_out.items()}
      return (x_BTD, shared), (caches_out, stacked(stats) if stats else None)

    if scan and r > 1:
      carry, (seg_caches, seg_stats) = jax.lax.scan(group_body, carry, xs)
    else:
      outs = []
      for g in range(r):
        carry, out = group_body(carry, jax.tree.map(lambda a, g=g: a[g], xs))
        outs.append(out)
      seg_caches, seg_stats = jax.tree.map(lambda *a: jnp.stack(a), *outs)
    flat = lambda tree: jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), tree)
    seg_caches = {n: flat(c) for n, c in seg_caches.items()}
    return carry, seg_caches, ([] if seg_stats is None else [flat(seg_stats)])


def stack_layers(cfg) -> dict:
  """{stack name: the model layer of each of its rows}: `layers.linear_attn.*` [n, ...] row j
  is layer stack_layers(cfg)['linear_attn'][j]; norm stacks hold every layer."""
  plan = layer_plan(cfg)
  out = {name: tuple(range(cfg.n_layers)) for name in every_layer_names(cfg)}
  for kinds in (plan.token, plan.channel):
    for kind in dict.fromkeys(kinds):
      out[part_class(kind).stack_name] = tuple(i for i, k in enumerate(kinds) if k == kind)
  return out


def layer_rows(cfg, name: str) -> tuple | None:
  """The model layer of each row of parameter (or module) `name`, e.g. 'layers.attn.q.kernel';
  None for a parameter outside the layer stacks."""
  if not name.startswith('layers.'):
    return None
  return stack_layers(cfg)[name.split('.')[1]]
