"""A decoder-only language model in Flax NNX: embeddings, the layer stack, the final norm and
the unembedding.

The layers are built from parts (lm/model/stack.py: token mixers and channel mixers in
lm/model/mixers/ and lm/model/moe.py, with norms placed per family), so one class covers Llama
2/3, Mistral, Qwen2/3, Phi-3/4, Gemma 1/2/3, OLMo 2/3, SmolLM3, the hybrid Qwen3.5/Qwen3-Next
stacks and the Mixture-of-Experts families through configuration. Layer stacks run as
`lax.scan`s over repeating groups of layers, so compile time does not grow with depth;
`scan_layers=False` unrolls the same stacked parameters, so checkpoints are interchangeable.

Every parameter carries logical axis names (`out_sharding`); lm/sharding.py maps them to the mesh.
Shape suffixes: B batch, T length, D d_model, H query heads, G kv heads, K head dim, F mlp, V vocab.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model import moe as moe_lib
from lm.model import quant
from lm.model import stack as stack_lib
from lm.model.layers import Linear, RMSNorm, configure_adapters, param
from lm.model.rope import apply_rope, rope, rope_frequencies  # noqa: F401 (the public names)
from lm.model.stack import UNROLL_MAX_LAYERS, scans_layers  # noqa: F401


def init_cache(cfg, batch_size: int, max_len: int) -> dict:
  """An empty decoding cache: {'layers': {stack name: each part's cache stacked over its layers},
  'positions', 'segment_ids': [B, S] (0: empty), 'index': slot of the next call's first token}."""
  plan = stack_lib.layer_plan(cfg)
  dtype = jnp.dtype(cfg.compute_dtype)
  layers = {}
  for kind in dict.fromkeys(plan.token):
    cls = stack_lib.part_class(kind)
    one = cls.init_cache(cfg, batch_size, max_len, dtype)
    n = plan.token.count(kind)
    layers[cls.stack_name] = jax.tree.map(lambda a, n=n: jnp.zeros((n, *a.shape), a.dtype), one)
  return {'layers': layers, 'positions': jnp.zeros((batch_size, max_len), jnp.int32),
          'segment_ids': jnp.zeros((batch_size, max_len), jnp.int32),
          'index': jnp.zeros((), jnp.int32)}


def cache_logical_axes(cfg) -> dict:
  """Logical axis names of init_cache's per-layer arrays ({'layers': {stack: {name: axes}}})."""
  plan = stack_lib.layer_plan(cfg)
  out = {}
  for kind in dict.fromkeys(plan.token):
    cls = stack_lib.part_class(kind)
    out[cls.stack_name] = {k: ('layers', *axes) for k, axes in cls.cache_axes().items()}
  return {'layers': out}


class Transformer(nnx.Module):
  """tokens_BT -> logits_BTV (float32); with a KV cache, -> (logits_BTV, updated cache).

  `adapters=False` runs the base model with every LoRA adapter switched off (the DPO reference of a
  LoRA run). `dropout_key` (set by ModelSpec.bind in training) drives adapter dropout; `reference`
  (set by ModelSpec.bind when the state carries `ref.*` weights) is a frozen copy for DPO.

  The cache (`init_cache`; lm/eval/generate.py fills it) holds each token mixer's per-layer
  state (attention: k/v [n, B, S, G, K]; gated DeltaNet: conv and recurrent state) and the
  shared 'positions', 'segment_ids' [B, S] (already holding this call's tokens) and 'index' (slot
  of this call's first token); the per-layer states travel through the layer scans.

  With experts (model.moe.n_experts > 0), a call without a cache that runs the adapters (the
  trained policy, not a DPO reference pass) adds its {'load_balancing', 'router_z'} losses to
  `router_losses` and counts itself in `router_calls`; lm/train/objectives.py reads them.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.cfg = cfg
    D, V = cfg.d_model, cfg.vocab_size
    # Small output-side inits make the initial prediction near uniform: loss ~= log(V).
    self.embed = param(rngs, nnx.initializers.normal(stddev=0.02), (V, D), ('vocab', 'embed'),
                        jnp.dtype(cfg.param_dtype))
    if cfg.per_layer_input_dim:  # Gemma 4's per-layer input embeddings (mixers/per_layer_input.py)
      L, P = cfg.n_layers, cfg.per_layer_input_dim
      self.embed_per_layer = param(rngs, nnx.initializers.normal(stddev=0.02),
                                   (cfg.per_layer_input_vocab or V, L * P), ('vocab', None),
                                   jnp.dtype(cfg.param_dtype))
      self.per_layer_proj = Linear((D,), (L, P), ('embed',), (None, None), name='per_layer_proj',
                                   cfg=cfg, rngs=rngs)
      self.per_layer_norm = RMSNorm(P, cfg=cfg, rngs=rngs, axis=None)
    self.layers = stack_lib.Stack(cfg, rngs=rngs)
    self.final_norm = RMSNorm(D, cfg=cfg, rngs=rngs)
    self.lm_head = None if cfg.tie_embeddings else Linear(
        (D,), (V,), ('embed',), ('vocab',), init_std=0.02, name='lm_head', cfg=cfg, rngs=rngs)
    self.dropout_key = None
    self.reference = None
    self.teacher = None  # a frozen teacher for distillation (ModelSpec.bind, `teacher.*` weights)
    self.router_losses = nnx.data(None)
    self.router_calls = 0

  def __call__(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, *,
               adapters=True):
    x_BTD, kv = self.hidden_states(tokens_BT, positions_BT, segment_ids_BT, cache,
                                   adapters=adapters)
    if self.lm_head is None:
      project, weights, _ = self.unembedding(adapters=adapters)
      logits_BTV = project(weights, x_BTD)
    else:  # through the Linear, so an adapted lm_head keeps its adapter dropout
      configure_adapters(self.lm_head, adapters, self._head_key(adapters))
      logits_BTV = _final_logits(self.lm_head(x_BTD), self.cfg.final_logit_softcap)
    if cache is None:
      return logits_BTV
    return logits_BTV, {**cache, 'layers': kv}

  def _layer_keys(self, adapters):
    """Adapter-dropout keys: [0] for lm_head, [1:] one per layer; None without dropout."""
    key = self.dropout_key if adapters else None
    return None if key is None else jax.random.split(key, self.cfg.n_layers + 1)

  def _head_key(self, adapters):
    keys = self._layer_keys(adapters)
    return None if keys is None else keys[0]

  def hidden_states(self, tokens_BT, positions_BT=None, segment_ids_BT=None, cache=None, *,
                    adapters=True):
    """The final-normed hidden states [B, T, D] in the compute dtype, and the updated per-layer
    cache states (None without a cache): everything but the unembedding."""
    cfg = self.cfg
    compute_dtype = jnp.dtype(cfg.compute_dtype)
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    embed = self.embed[...]
    x_BTD = jnp.take(embed, tokens_BT, axis=0)
    if cfg.embed_scale:  # Gemma: the scale is rounded to the weights' dtype, as in HF
      x_BTD = x_BTD * jnp.asarray(math.sqrt(cfg.d_model), embed.dtype)
    x_BTD = x_BTD.astype(compute_dtype)
    per_layer = jax.tree.map(jnp.asarray, stack_lib.per_layer_values(cfg))
    if cfg.per_layer_input_dim:
      per_layer['per_layer_input'] = self._per_layer_inputs(tokens_BT, x_BTD, adapters)
    layer_keys = self._layer_keys(adapters)
    if layer_keys is not None:
      per_layer['key'] = layer_keys[1:]
    ctx = {'positions_BT': positions_BT, 'segment_ids_BT': segment_ids_BT}
    if cache is not None:
      ctx.update(index=cache['index'], cache_positions=cache['positions'],
                 cache_segment_ids=cache['segment_ids'])
    x_BTD, kv, stats = self.layers(
        x_BTD, ctx, per_layer, None if cache is None else cache['layers'], adapters=adapters,
        remat=cfg.remat, scan=scans_layers(cfg))
    if stats is not None and cache is None and adapters:
      losses = moe_lib.router_losses(stats)
      if self.router_losses is not None:
        losses = jax.tree.map(jnp.add, self.router_losses, losses)
      self.router_losses, self.router_calls = nnx.data(losses), self.router_calls + 1
    return self.final_norm(x_BTD), kv

  def _per_layer_inputs(self, tokens_BT, x_BTD, adapters):
    """Gemma 4's per-layer inputs [L, B, T, P]: (norm(proj(x) / sqrt(D)) + the token's own
    per-layer embedding · sqrt(P)) / sqrt(2), as transformers' project_per_layer_inputs."""
    cfg = self.cfg
    L, P = cfg.n_layers, cfg.per_layer_input_dim
    table = self.embed_per_layer[...]
    own_BTLP = (jnp.take(table, tokens_BT, axis=0) * jnp.asarray(math.sqrt(P), table.dtype)
                ).reshape(*tokens_BT.shape, L, P).astype(x_BTD.dtype)
    configure_adapters(self.per_layer_proj, adapters, None)
    mixed_BTLP = self.per_layer_norm(self.per_layer_proj(x_BTD) * cfg.d_model ** -0.5)
    return jnp.moveaxis((mixed_BTLP + own_BTLP) * 2 ** -0.5, 2, 0)

  def unembedding(self, *, adapters=True):
    """(project, weights, axes): `project(weights, x_BTD)` gives the float32 logits and is a pure
    function of its arguments, so a loss can run it chunk by chunk (lm/train/losses.py); `axes`
    are the weights' logical axis names.

    None when lm_head carries a LoRA adapter with dropout in training: that head is no single
    matrix, and callers fall back to the whole logits.
    """
    compute_dtype = jnp.dtype(self.cfg.compute_dtype)
    if self.lm_head is None:
      weights, spec, axes = self.embed[...], 'btd,vd->btv', ('vocab', 'embed')
    else:
      head = self.lm_head
      # A QLoRA kernel arrives quantized (lm/model/quant.py): dequantized as Linear does.
      weights, spec, axes = quant.as_array(head.kernel.get_value()), 'btd,dv->btv', ('embed', 'vocab')
      if head.lora_rank and adapters:
        if head.lora_dropout and self._head_key(adapters) is not None:
          return None
        weights = weights + jnp.tensordot(head.lora_a[...], head.lora_b[...] * head.lora_scale, 1)
    softcap = self.cfg.final_logit_softcap

    def project(w, x_BTD):
      logits = jnp.einsum(spec, x_BTD.astype(compute_dtype), w.astype(compute_dtype))
      return _final_logits(logits, softcap)

    return project, weights, axes


def _final_logits(logits_BTV, softcap=0.0):
  """Logits as the losses and decoding see them: float32, with Gemma 2/3's final soft cap
  (cap * tanh(logits / cap)) when set. Both the whole-logits call and the chunked loss
  (unembedding's `project`) go through here, so the chunked loss is exact for Gemma too."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  if softcap:
    logits_BTV = softcap * jnp.tanh(logits_BTV / softcap)
  return logits_BTV
