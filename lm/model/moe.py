"""Mixture-of-Experts feed-forward: a router sends each token to k of E gated-MLP experts.

Routing, as each family computes it (softmax over all E router logits, then the top k):
  Mixtral    the k weights are renormalised to sum to 1;
  Qwen3-MoE  renormalised only when its config sets `norm_topk_prob`, else the raw probabilities.
`model.moe.norm_topk_prob` is that one difference. Router logits and probabilities are float32
whatever the compute dtype: in bfloat16 the top-k choice flips between near-equal experts.

Dropless: every token reaches all k of its experts, whatever the load. The N·k (token, expert)
copies are sorted by expert and each expert's SwiGLU runs on its contiguous group in one grouped
matmul (`jax.lax.ragged_dot`, group sizes known only at run time); the outputs are un-sorted and
summed with their routing weights. `implementation='dense'` runs every expert on every token and
weights the results by the (sparse) routing weights: the same function at E/k times the FLOPs,
kept as the reference the grouped path is tested against.

Router statistics per layer feed the two auxiliary losses (lm/train/objectives.py):
  load balancing (Switch Transformer, as HF `load_balancing_loss_func` computes it over all layers):
      E · sum_e f_e · P_e, f_e = share of the N·k assignments that went to expert e (mean over
      layers), P_e = mean router probability of expert e (mean over tokens and layers);
  router z-loss (ST-MoE): mean over tokens and layers of logsumexp(router logits)^2.
Padding tokens (segment id 0) count in neither, as HF excludes them with its attention mask.

Shapes: N tokens (B·T), E experts, k experts per token, M = N·k routed copies, D d_model,
F expert hidden size, r LoRA rank.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lm.model import precision

ACTIVATIONS = {'silu': jax.nn.silu, 'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True)}


def _param(rngs, init, shape, axes, dtype):
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


def route(router_logits_NE, k: int, norm_topk_prob: bool):
  """(probabilities [N, E], top-k weights [N, k], top-k expert ids [N, k]), all float32 but ids."""
  probs_NE = jax.nn.softmax(router_logits_NE.astype(jnp.float32), axis=-1)
  weights_Nk, experts_Nk = jax.lax.top_k(probs_NE, k)
  if norm_topk_prob:
    weights_Nk = weights_Nk / jnp.sum(weights_Nk, axis=-1, keepdims=True)
  return probs_NE, weights_Nk, experts_Nk


def router_stats(router_logits_NE, probs_NE, experts_Nk, mask_N):
  """One layer's {'expert_fraction' [E], 'router_prob' [E], 'z' []} over unmasked tokens."""
  E = probs_NE.shape[-1]
  mask_N = mask_N.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask_N), 1.0)
  assigned_NE = jnp.sum(jax.nn.one_hot(experts_Nk, E, dtype=jnp.float32), axis=1)
  z_N = jax.nn.logsumexp(router_logits_NE.astype(jnp.float32), axis=-1) ** 2
  return {'expert_fraction': jnp.sum(assigned_NE * mask_N[:, None], axis=0) / count,
          'router_prob': jnp.sum(probs_NE * mask_N[:, None], axis=0) / count,
          'z': jnp.sum(z_N * mask_N) / count}


def router_losses(stats) -> dict:
  """Per-layer stats stacked [L, ...] -> {'load_balancing', 'router_z'} scalars (HF's formula:
  fractions and probabilities averaged over layers first, then multiplied)."""
  f_E = jnp.mean(stats['expert_fraction'], axis=0)
  p_E = jnp.mean(stats['router_prob'], axis=0)
  return {'load_balancing': f_E.shape[-1] * jnp.sum(f_E * p_E), 'router_z': jnp.mean(stats['z'])}


class ExpertLinear(nnx.Module):
  """E kernels [E, in, out] used as one; with LoRA, per-expert A [E, in, r] and B [E, r, out].

  `name` is matched against `model.lora.targets` as `Linear` does (layers.moe.gate, .up, .down),
  so the default targets adapt every expert. B starts at zero: an adapted model starts as its base.
  """

  def __init__(self, n_experts, d_in, d_out, in_axis, out_axis, *, name, cfg, rngs):
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    dtype = jnp.dtype(cfg.param_dtype)
    E = n_experts
    self.kernel = _param(rngs, nnx.initializers.normal(stddev=d_in ** -0.5), (E, d_in, d_out),
                         ('expert', in_axis, out_axis), dtype)
    lora = cfg.lora
    self.lora_rank = lora.rank if lora.rank and re.search(lora.targets, name) else 0
    if self.lora_rank:
      r = self.lora_rank
      bound = d_in ** -0.5  # PEFT's kaiming-uniform A, per expert
      uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
      self.lora_a = _param(rngs, uniform, (E, d_in, r), ('expert', in_axis, None), dtype)
      self.lora_b = _param(rngs, nnx.initializers.zeros, (E, r, d_out), ('expert', None, out_axis),
                           dtype)
      self.lora_scale = lora.alpha / (math.sqrt(r) if lora.rslora else r)
      self.lora_dropout = lora.dropout
    self.adapters = True  # set per call by Transformer.__call__, as for Linear
    self.dropout_key = None

  def _adapter_input(self, x):
    if self.lora_dropout and self.dropout_key is not None:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.lora_dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0.0).astype(x.dtype)
    return x

  def _weights(self):
    cast = lambda p: p[...].astype(self.compute_dtype)
    kernel = precision.to_compute_dtype(self.kernel[...], self.compute_dtype)
    if not (self.lora_rank and self.adapters):
      return kernel, None, None
    return kernel, cast(self.lora_a), (self.lora_b[...] * self.lora_scale).astype(
        self.compute_dtype)

  def grouped(self, x_MI, group_sizes_E):
    """x_MI sorted by expert (group e: group_sizes_E[e] rows) -> [M, out], each row by its expert."""
    w, a, b = self._weights()
    x_MI = x_MI.astype(self.compute_dtype)
    y = jax.lax.ragged_dot(x_MI, w, group_sizes_E)
    if a is not None:
      h_Mr = jax.lax.ragged_dot(self._adapter_input(x_MI), a, group_sizes_E)
      y = y + jax.lax.ragged_dot(h_Mr, b, group_sizes_E)
    return y

  def dense(self, x):
    """x [N, in] (one input for all experts) or [N, E, in] (one per expert) -> [N, E, out]."""
    w, a, b = self._weights()
    x = x.astype(self.compute_dtype)
    spec = 'ni,eio->neo' if x.ndim == 2 else 'nei,eio->neo'
    y = jnp.einsum(spec, x, w)
    if a is not None:
      h_NEr = jnp.einsum(spec.replace('o', 'r'), self._adapter_input(x), a)
      y = y + jnp.einsum('ner,ero->neo', h_NEr, b)
    return y


class MoE(nnx.Module):
  """Router [D, E] (no adapter: train it through a partition) and E gated-MLP experts."""

  stack_name = 'moe'

  def __init__(self, cfg, *, rngs):
    D, E = cfg.d_model, cfg.moe.n_experts
    F = cfg.moe.expert_dim or cfg.mlp_dim
    self.router = _param(rngs, nnx.initializers.normal(stddev=D ** -0.5), (D, E), ('embed', None),
                         jnp.dtype(cfg.param_dtype))
    experts = functools.partial(ExpertLinear, E, cfg=cfg, rngs=rngs)
    self.gate = experts(D, F, 'embed', 'mlp', name='layers.moe.gate')
    self.up = experts(D, F, 'embed', 'mlp', name='layers.moe.up')
    self.down = experts(F, D, 'mlp', 'embed', name='layers.moe.down')
    self.k = cfg.moe.experts_per_token
    self.norm_topk_prob = cfg.moe.norm_topk_prob
    self.implementation = cfg.moe.implementation
    self.activation = cfg.mlp_activation

  def __call__(self, x_BTD, ctx=None):
    """-> (y [B, T, D], this layer's router stats for the auxiliary losses). Tokens of segment
    id 0 (padding, in ctx.segment_ids_BT) count in no statistic."""
    segment_ids_BT = None if ctx is None else ctx.segment_ids_BT
    mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    logits_NE = jnp.dot(x_ND.astype(jnp.float32), self.router[...].astype(jnp.float32))
    probs_NE, weights_Nk, experts_Nk = route(logits_NE, self.k, self.norm_topk_prob)
    mask_N = jnp.ones((B * T,), bool) if mask_BT is None else mask_BT.reshape(-1)
    stats = router_stats(logits_NE, probs_NE, experts_Nk, mask_N)
    if self.implementation == 'dense':
      y_ND = self._dense(x_ND, weights_Nk, experts_Nk)
    else:
      y_ND = self._grouped(x_ND, weights_Nk, experts_Nk)
    return y_ND.reshape(B, T, D).astype(x_BTD.dtype), stats

  def _grouped(self, x_ND, weights_Nk, experts_Nk):
    N, k = experts_Nk.shape
    E = self.router.shape[-1]
    flat_M = experts_Nk.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)  # copies grouped by expert
    group_sizes_E = jnp.bincount(flat_M, length=E).astype(jnp.int32)
    x_MD = jnp.take(x_ND, order_M // k, axis=0)
    act = ACTIVATIONS[self.activation]
    h_MF = act(self.gate.grouped(x_MD, group_sizes_E)) * self.up.grouped(x_MD, group_sizes_E)
    y_MD = self.down.grouped(h_MF, group_sizes_E)
    # Un-sort with a gather (its transpose is the only scatter), then weight and sum the k copies.
    y_NkD = jnp.take(y_MD, jnp.argsort(order_M), axis=0).reshape(N, k, -1)
    return jnp.einsum('nkd,nk->nd', y_NkD.astype(jnp.float32), weights_Nk)

  def _dense(self, x_ND, weights_Nk, experts_Nk):
    E = self.router.shape[-1]
    act = ACTIVATIONS[self.activation]
    h_NEF = act(self.gate.dense(x_ND)) * self.up.dense(x_ND)
    y_NED = self.down.dense(h_NEF)
    weights_NE = jnp.sum(jax.nn.one_hot(experts_Nk, E, dtype=jnp.float32) * weights_Nk[..., None],
                         axis=1)
    return jnp.einsum('ned,ne->nd', y_NED.astype(jnp.float32), weights_NE)
