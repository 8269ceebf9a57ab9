"""Mixture-of-Experts feed-forward: a router sends each token to k of E gated-MLP experts, and
optionally every token also through a shared expert.

Routing is each family's own (lm/model/routers.py: softmax, sigmoid with a correction bias and
group-limited top-k, top-k then softmax, top-k then sigmoid). The experts are SwiGLU (GeGLU with
gelu_tanh), with biases and gpt-oss's clamped SwiGLU when `model.moe.expert_bias` /
`swiglu_limit` ask. A shared expert (`shared_dim` > 0) is a dense gated MLP added to the routed
output, times sigmoid(x · w) with `shared_gate` (Qwen3-Next, Qwen3.5-MoE); DeepSeek-V3 and
GLM-4.5's n_shared_experts are one such MLP n times as wide, as transformers builds them.

Gemma 4 (26B-A4B) runs its dense MLP and its experts side by side as two branches with norms of
their own (`branch_norms`): the layer hands the block its residual x un-normed, and

    y = shared_post_norm(shared(mlp_norm(x))) + experts_post_norm(experts(experts_norm(x)))

with the router reading x itself (its 'scaled_softmax' kind RMS-normalises it without weight,
times a learned scale [D] and D^-1/2, and scales each routing weight by its expert's learned
factor, `expert_scale` [E]); the layer's mlp_post_norm then follows as in any sandwich layer.

Dropless: every token reaches all k of its experts, whatever the load. The N·k (token, expert)
copies are sorted by expert and each expert's SwiGLU runs on its contiguous group in one grouped
matmul (`jax.lax.ragged_dot`, group sizes known only at run time); the outputs are un-sorted and
summed with their routing weights. `implementation='dense'` runs every expert on every token and
weights the results by the (sparse) routing weights: the same function at E/k times the FLOPs,
kept as the reference the grouped path is tested against.

Router statistics per layer feed the two auxiliary losses (lm/train/objectives.py) and the
aux-loss-free balancing of the sigmoid router's correction bias (lm/train/balancing.py):
  load balancing (Switch Transformer, as HF `load_balancing_loss_func` computes it over all layers,
      from the softmax of the router logits whatever the router):
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
from jax.sharding import PartitionSpec as P

from lm.model import precision, routers
from lm.model.layers import ACTIVATIONS, RMSNorm, param, weightless_rms_norm
from lm.model.mixers.mlp import MLP

EXPERT_AXIS = 'expert'  # mesh axis the experts are split over (expert parallelism)
# Mesh axes the tokens of a batch are split over, in the order of mesh.rules' 'batch' and then the
# sequence ('context'): the expert-parallel path keeps that split and exchanges copies within it.
TOKEN_AXES = ('data', 'fsdp', 'expert', 'context')


def router_stats(router_logits_NE, probs_NE, experts_Nk, mask_N):
  """One layer's {'expert_fraction' [E], 'router_prob' [E], 'z' [], 'dropped' []} over unmasked
  tokens; 'dropped' is set by the expert-parallel path when a capacity limit drops copies."""
  E = probs_NE.shape[-1]
  mask_N = mask_N.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(mask_N), 1.0)
  assigned_NE = jnp.sum(jax.nn.one_hot(experts_Nk, E, dtype=jnp.float32), axis=1)
  z_N = jax.nn.logsumexp(router_logits_NE.astype(jnp.float32), axis=-1) ** 2
  return {'expert_fraction': jnp.sum(assigned_NE * mask_N[:, None], axis=0) / count,
          'router_prob': jnp.sum(probs_NE * mask_N[:, None], axis=0) / count,
          'z': jnp.sum(z_N * mask_N) / count,
          'dropped': jnp.zeros((), jnp.float32)}  # share of copies over capacity (expert parallel)


def router_losses(stats) -> dict:
  """Per-layer stats stacked [L, ...] -> {'load_balancing', 'router_z', 'dropped'} scalars (HF's formula:
  fractions and probabilities averaged over layers first, then multiplied) and each layer's
  'expert_load' [L, E]."""
  f_E = jnp.mean(stats['expert_fraction'], axis=0)
  p_E = jnp.mean(stats['router_prob'], axis=0)
  return {'load_balancing': f_E.shape[-1] * jnp.sum(f_E * p_E), 'router_z': jnp.mean(stats['z']),
          'dropped': jnp.mean(stats['dropped']),
          'expert_load': stats['expert_fraction']}  # [L, E]: the correction bias's update reads it


def grouped_matmul(x_MI, group_sizes_E, experts_M, weights, adapter_input=lambda x: x):
  """Rows of x_MI grouped by expert times their expert's (kernel, bias, LoRA A, B) `weights`.
  Rows past the last group (the expert-parallel path's empty slots) come out as zero or bias."""
  w, bias, a, b = weights
  y = jax.lax.ragged_dot(x_MI, w, group_sizes_E)
  if a is not None:
    h_Mr = jax.lax.ragged_dot(adapter_input(x_MI), a, group_sizes_E)
    y = y + jax.lax.ragged_dot(h_Mr, b, group_sizes_E)
  if bias is not None:
    y = y + jnp.take(bias, experts_M, axis=0, mode='clip')
  return y


class ExpertLinear(nnx.Module):
  """E kernels [E, in, out] used as one; with LoRA, per-expert A [E, in, r] and B [E, r, out].

  `name` is matched against `model.lora.targets` as `Linear` does (layers.moe.gate, .up, .down),
  so the default targets adapt every expert. B starts at zero: an adapted model starts as its base.
  """

  def __init__(self, n_experts, d_in, d_out, in_axis, out_axis, *, name, cfg, rngs,
               use_bias=False):
    self.compute_dtype = jnp.dtype(cfg.compute_dtype)
    dtype = jnp.dtype(cfg.param_dtype)
    E = n_experts
    self.kernel = param(rngs, nnx.initializers.normal(stddev=d_in ** -0.5), (E, d_in, d_out),
                         ('expert', in_axis, out_axis), dtype)
    self.bias = (param(rngs, nnx.initializers.zeros, (E, d_out), ('expert', out_axis), dtype)
                 if use_bias else None)
    lora = cfg.lora
    self.lora_rank = lora.rank if lora.rank and re.search(lora.targets, name) else 0
    if self.lora_rank:
      r = self.lora_rank
      bound = d_in ** -0.5  # PEFT's kaiming-uniform A, per expert
      uniform = lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound)
      self.lora_a = param(rngs, uniform, (E, d_in, r), ('expert', in_axis, None), dtype)
      self.lora_b = param(rngs, nnx.initializers.zeros, (E, r, d_out), ('expert', None, out_axis),
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

  def weights(self):
    """(kernel [E, in, out], bias [E, out] or None, lora A, lora B times its scale or None) in the
    compute dtype: what `grouped_matmul` takes, so the expert-parallel path can pass each device
    its experts' slices."""
    w, a, b = self._weights()
    bias = None if self.bias is None else self.bias[...].astype(self.compute_dtype)
    return w, bias, a, b

  def grouped(self, x_MI, group_sizes_E, experts_M):
    """x_MI sorted by expert (group e: group_sizes_E[e] rows; row m is expert experts_M[m]'s)
    -> [M, out], each row by its expert."""
    return grouped_matmul(x_MI.astype(self.compute_dtype), group_sizes_E, experts_M,
                          self.weights(), self._adapter_input)

  def dense(self, x):
    """x [N, in] (one input for all experts) or [N, E, in] (one per expert) -> [N, E, out]."""
    w, a, b = self._weights()
    x = x.astype(self.compute_dtype)
    spec = 'ni,eio->neo' if x.ndim == 2 else 'nei,eio->neo'
    y = jnp.einsum(spec, x, w)
    if a is not None:
      h_NEr = jnp.einsum(spec.replace('o', 'r'), self._adapter_input(x), a)
      y = y + jnp.einsum('ner,ero->neo', h_NEr, b)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.compute_dtype)
    return y


class MoE(nnx.Module):
  """Router [D, E] (no adapter: train it through a partition), E gated-MLP experts and an optional
  shared expert. The sigmoid router's `correction_bias` [E] is not trained by the gradient: the
  train step moves it (lm/train/balancing.py), so every partition leaves it frozen."""

  stack_name = 'moe'

  def __init__(self, cfg, *, rngs):
    moe = cfg.moe
    D, E = cfg.d_model, moe.n_experts
    F = moe.expert_dim or cfg.mlp_dim
    dtype = jnp.dtype(cfg.param_dtype)
    self.router = param(rngs, nnx.initializers.normal(stddev=D ** -0.5), (D, E), ('embed', None),
                         dtype)
    self.kind = moe.get('router', 'softmax')
    scaled = self.kind == 'scaled_softmax'  # Gemma 4: the router's input and weights scaled
    self.router_scale = param(rngs, nnx.initializers.ones, (D,), ('embed',), dtype) if scaled else None
    self.expert_scale = param(rngs, nnx.initializers.ones, (E,), (None,), dtype) if scaled else None
    self.norm_eps = cfg.norm_eps
    self.router_bias = (param(rngs, nnx.initializers.zeros, (E,), (None,), dtype)
                        if moe.get('router_bias') else None)
    self.correction_bias = (param(rngs, nnx.initializers.zeros, (E,), (None,), jnp.float32)
                            if self.kind == 'sigmoid' else None)
    experts = functools.partial(ExpertLinear, E, cfg=cfg, rngs=rngs,
                                use_bias=bool(moe.get('expert_bias')))
    self.gate = experts(D, F, 'embed', 'mlp', name='layers.moe.gate')
    self.up = experts(D, F, 'embed', 'mlp', name='layers.moe.up')
    self.down = experts(F, D, 'mlp', 'embed', name='layers.moe.down')
    shared_dim = moe.get('shared_dim', 0)
    self.shared = (MLP(cfg, rngs=rngs, hidden=shared_dim, name='layers.moe.shared', bias=False)
                   if shared_dim else None)
    self.shared_gate = (param(rngs, nnx.initializers.normal(stddev=D ** -0.5), (D,), ('embed',),
                               dtype) if shared_dim and moe.get('shared_gate') else None)
    # Gemma 4: the shared MLP and the experts each with their own norms; the stack then passes the
    # residual and the layer's mlp_norm (the shared branch's pre-norm) instead of a normed input.
    self.own_norms = bool(moe.get('branch_norms'))
    if self.own_norms:
      norm = functools.partial(RMSNorm, D, cfg=cfg, rngs=rngs)
      self.shared_post_norm, self.experts_norm, self.experts_post_norm = norm(), norm(), norm()
    self.k = moe.experts_per_token
    self.route_args = dict(norm_topk_prob=moe.norm_topk_prob, n_group=moe.get('n_group', 1),
                           topk_group=moe.get('topk_group', 1),
                           scale=moe.get('routed_scaling_factor', 1.0))
    self.implementation = moe.implementation
    self.capacity_factor = moe.get('capacity_factor', 0.0)
    self.activation = cfg.mlp_activation
    self.swiglu = (moe.get('swiglu_limit', 0.0), moe.get('swiglu_alpha', 1.702))

  def _glu(self, g, u):
    """The experts' gated activation: act(g) * u, or gpt-oss's clamped SwiGLU (its limit keeps
    large activations from overflowing in low precision)."""
    limit, alpha = self.swiglu
    if not limit:
      return ACTIVATIONS[self.activation](g) * u
    g = jnp.minimum(g, limit)
    u = jnp.clip(u, -limit, limit)
    return (u + 1) * (g * jax.nn.sigmoid(g * alpha))

  def _router_input(self, x_ND):
    """What the router multiplies, in float32: x, or for scaled_softmax (Gemma 4) x
    RMS-normalised without weight, times the learned scale and D^-1/2."""
    x32 = x_ND.astype(jnp.float32)
    if self.router_scale is None:
      return x32
    normed = weightless_rms_norm(x32, self.norm_eps)
    return normed * self.router_scale[...].astype(jnp.float32) * x_ND.shape[-1] ** -0.5

  def __call__(self, x_BTD, ctx=None, pre_norm=None):
    """-> (y [B, T, D], this layer's router stats for the auxiliary losses and the bias update).
    Tokens of segment id 0 (padding, in ctx.segment_ids_BT) count in no statistic. With
    `own_norms` (Gemma 4), x_BTD is the layer's residual and `pre_norm` the shared MLP's norm."""
    segment_ids_BT = None if ctx is None else ctx.segment_ids_BT
    mask_BT = None if segment_ids_BT is None else segment_ids_BT > 0
    B, T, D = x_BTD.shape
    x_ND = x_BTD.reshape(B * T, D)
    logits_NE = jnp.dot(self._router_input(x_ND), self.router[...].astype(jnp.float32))
    if self.router_bias is not None:
      logits_NE = logits_NE + self.router_bias[...].astype(jnp.float32)
    correction = None if self.correction_bias is None else self.correction_bias[...]
    expert_scale = None if self.expert_scale is None else self.expert_scale[...]
    weights_Nk, experts_Nk = routers.route(self.kind, logits_NE, self.k, correction_E=correction,
                                           expert_scale_E=expert_scale, **self.route_args)
    shared_in_ND = x_ND
    if self.own_norms:  # Gemma 4: each branch normalises the residual with its own norm
      shared_in_ND = (x_ND if pre_norm is None else pre_norm(x_ND))
      x_ND = self.experts_norm(x_ND)
    mask_N = jnp.ones((B * T,), bool) if mask_BT is None else mask_BT.reshape(-1)
    probs_NE = jax.nn.softmax(logits_NE, axis=-1)
    stats = router_stats(logits_NE, probs_NE, experts_Nk, mask_N)
    on_input = self.kind in routers.INPUT_WEIGHTED
    ep_axes = self._expert_parallel_axes(B * T)
    if self.implementation == 'dense':
      y_ND = self._dense(x_ND, weights_Nk, experts_Nk, on_input)
    elif ep_axes:
      y_ND, dropped = self._expert_parallel(x_ND, weights_Nk, experts_Nk, on_input, ep_axes)
      stats['dropped'] = dropped / jnp.maximum(jnp.sum(mask_N), 1.0) / self.k
    else:
      y_ND = self._grouped(x_ND, weights_Nk, experts_Nk, on_input)
    if self.own_norms:
      y_ND = self.experts_post_norm(y_ND)
    if self.shared is not None:
      shared_ND = self.shared(shared_in_ND, ctx)[0].astype(jnp.float32)
      if self.shared_gate is not None:
        gate_N = jnp.dot(x_ND.astype(jnp.float32), self.shared_gate[...].astype(jnp.float32))
        shared_ND = jax.nn.sigmoid(gate_N)[:, None] * shared_ND
      if self.own_norms:
        shared_ND = self.shared_post_norm(shared_ND)
      y_ND = y_ND + shared_ND
    return y_ND.reshape(B, T, D).astype(x_BTD.dtype), stats

  def _grouped(self, x_ND, weights_Nk, experts_Nk, on_input):
    N, k = experts_Nk.shape
    E = self.router.shape[-1]
    flat_M = experts_Nk.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True)  # copies grouped by expert
    group_sizes_E = jnp.bincount(flat_M, length=E).astype(jnp.int32)
    experts_M = flat_M[order_M]
    x_MD = jnp.take(x_ND, order_M // k, axis=0)
    if on_input:  # Llama 4: the expert sees the weighted token, its output is summed as is
      x_MD = x_MD * jnp.take(weights_Nk.reshape(-1), order_M)[:, None].astype(x_MD.dtype)
    h_MF = self._glu(self.gate.grouped(x_MD, group_sizes_E, experts_M),
                     self.up.grouped(x_MD, group_sizes_E, experts_M))
    y_MD = self.down.grouped(h_MF, group_sizes_E, experts_M)
    # Un-sort with a gather (its transpose is the only scatter), then weight and sum the k copies.
    y_NkD = jnp.take(y_MD, jnp.argsort(order_M), axis=0).reshape(N, k, -1).astype(jnp.float32)
    if on_input:
      return jnp.sum(y_NkD, axis=1)
    return jnp.einsum('nkd,nk->nd', y_NkD, weights_Nk)

  def _expert_parallel_axes(self, N):
    """The mesh axes the N tokens are split over when the experts are split over the `expert`
    axis and the all-to-all path applies; () otherwise (no mesh, one expert shard, experts or
    tokens that do not divide, or LoRA dropout, whose key the per-device body does not take)."""
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty else mesh.shape.get(EXPERT_AXIS, 1)
    E = self.router.shape[-1]
    dropout = any(lin.lora_rank and lin.lora_dropout and lin.dropout_key is not None
                  for lin in (self.gate, self.up, self.down))
    if n == 1 or E % n or dropout:
      return ()
    axes = tuple(a for a in TOKEN_AXES if mesh.shape.get(a, 1) > 1)
    return axes if N % math.prod(mesh.shape[a] for a in axes) == 0 else ()

  def _expert_parallel(self, x_ND, weights_Nk, experts_Nk, on_input, token_axes):
    """Expert parallelism: each device routes its own tokens, sends every (token, expert) copy
    to the device that holds the expert with one all-to-all over the `expert` axis, runs its
    local experts on what it received (one grouped matmul per projection) and returns the
    outputs with a second all-to-all. Each device sends a fixed-size buffer of C slots to each
    of the n expert devices: C = every copy it holds (dropless, `model.moe.capacity_factor` 0)
    or capacity_factor x its even share (copies past C are dropped and counted). The gradient
    flows back through the transposed all-to-alls. -> (y [N, D] float32, copies dropped)."""
    mesh = jax.sharding.get_abstract_mesh()
    n = mesh.shape[EXPERT_AXIS]
    E = self.router.shape[-1]
    E_local = E // n
    k = self.k
    M_local = x_ND.shape[0] * k // math.prod(mesh.shape[a] for a in token_axes)
    C = M_local if not self.capacity_factor else min(
        M_local, max(1, math.ceil(self.capacity_factor * M_local / n)))
    glu = self._glu
    compute = self.gate.compute_dtype

    def body(x_ND, weights_Nk, experts_Nk, gate_w, up_w, down_w):
      flat_M = experts_Nk.reshape(-1)
      order_M = jnp.argsort(flat_M, stable=True)  # copies grouped by expert, so by device
      experts_M = flat_M[order_M]
      dest_M = experts_M // E_local
      send_n = jnp.bincount(dest_M, length=n)
      start_n = jnp.cumsum(send_n) - send_n
      rank_M = jnp.arange(flat_M.shape[0]) - start_n[dest_M]  # place in its device's buffer
      kept_M = rank_M < C
      x_MD = jnp.take(x_ND, order_M // k, axis=0).astype(compute)
      if on_input:
        x_MD = x_MD * jnp.take(weights_Nk.reshape(-1), order_M)[:, None].astype(compute)
      # Slot c of the buffer for device j holds that device's c-th copy, if there is one.
      filled_nC = jnp.arange(C)[None, :] < send_n[:, None]
      source_nC = jnp.where(filled_nC, start_n[:, None] + jnp.arange(C)[None, :], 0)
      send_nCD = jnp.where(filled_nC[..., None], jnp.take(x_MD, source_nC, axis=0), 0)
      local_nC = jnp.where(filled_nC, experts_M[source_nC] - jnp.arange(n)[:, None] * E_local,
                           E_local)  # the expert's index on its device; E_local: empty slot
      exchange = lambda a: jax.lax.all_to_all(a, EXPERT_AXIS, 0, 0, tiled=True)
      recv_nCD, recv_local_nC = exchange(send_nCD), exchange(local_nC)
      # On this device: every received copy, grouped by local expert (empty slots last).
      recv_R = recv_local_nC.reshape(-1)
      by_expert_R = jnp.argsort(recv_R, stable=True)
      group_sizes = jnp.bincount(recv_R, length=E_local).astype(jnp.int32)
      local_R = recv_R[by_expert_R]
      xr_RD = jnp.take(recv_nCD.reshape(n * C, -1), by_expert_R, axis=0)
      h_RF = glu(grouped_matmul(xr_RD, group_sizes, local_R, gate_w),
                 grouped_matmul(xr_RD, group_sizes, local_R, up_w))
      y_RD = grouped_matmul(h_RF, group_sizes, local_R, down_w)
      back_nCD = exchange(jnp.take(y_RD, jnp.argsort(by_expert_R), axis=0).reshape(n, C, -1))
      y_MD = jnp.where(kept_M[:, None], back_nCD[dest_M, jnp.minimum(rank_M, C - 1)], 0)
      y_NkD = jnp.take(y_MD, jnp.argsort(order_M), axis=0).reshape(-1, k, y_MD.shape[-1])
      y_NkD = y_NkD.astype(jnp.float32)
      y_ND = (jnp.sum(y_NkD, axis=1) if on_input
              else jnp.einsum('nkd,nk->nd', y_NkD, weights_Nk))
      return y_ND, jnp.sum(~kept_M, keepdims=True).astype(jnp.float32)

    tokens = P(token_axes)
    experts = P(EXPERT_AXIS)
    y_ND, dropped = jax.shard_map(
        body, mesh=mesh, in_specs=(tokens, tokens, tokens, experts, experts, experts),
        out_specs=(tokens, tokens), check_vma=False)(
            x_ND, weights_Nk, experts_Nk, self.gate.weights(), self.up.weights(),
            self.down.weights())
    return y_ND, jnp.sum(dropped)

  def _dense(self, x_ND, weights_Nk, experts_Nk, on_input):
    E = self.router.shape[-1]
    chosen_NkE = jax.nn.one_hot(experts_Nk, E, dtype=jnp.float32)
    weights_NE = jnp.sum(chosen_NkE * weights_Nk[..., None], axis=1)
    if on_input:
      # Every expert sees x times its weight (0 when unchosen); a biased expert maps 0 to no 0,
      # so the unchosen ones are masked out below as well.
      x_NED = x_ND[:, None, :] * weights_NE[..., None].astype(x_ND.dtype)
      h_NEF = self._glu(self.gate.dense(x_NED), self.up.dense(x_NED))
      weights_NE = jnp.sum(chosen_NkE, axis=1)
    else:
      h_NEF = self._glu(self.gate.dense(x_ND), self.up.dense(x_ND))
    y_NED = self.down.dense(h_NEF)
    return jnp.einsum('ned,ne->nd', y_NED.astype(jnp.float32), weights_NE)
