"""Analytic FLOPs of one train step, per mode: what the step computes, counted from its shapes.

A matmul weight of n parameters costs, per token, 2n in the forward pass, 2n for the gradient of
its input (only where something below it trains) and 2n for its own gradient (only if it
trains). So full training is ~6N per token, LoRA ~4N plus the adapters, and layers below the
lowest trainable one cost the forward only. Attention scores add 4·H·K per key per layer forward
(QKᵀ and PV; 2·H·(Kqk + Kv) with MLA's head dims; a causal query sees (T+1)/2 keys on average, a window of w about w) and twice that
backward. Rematerialisation recomputes, in the backward pass, the forward work its policy did
not save: `full` the whole layer, `dots_no_batch` the attention einsums (batch dims), `dots`
nothing of note. DPO runs the policy on chosen and rejected rows and the reference forward only.
Packed segments are counted as full-length causal rows (an upper bound).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm.model.spec import FROZEN_COPIES
from lm.train import partition
from lm.train.flops import attention_head_dims

_MATMUL_SUFFIXES = ('.kernel', '.lora_a', '.lora_b')


@dataclasses.dataclass(frozen=True)
class StepFlops:
  forward: float  # policy forward
  input_grads: float  # backward through activations
  weight_grads: float  # gradients of trainable weights
  reference: float  # DPO's reference forward
  recompute: float  # rematerialisation
  tokens: int  # tokens the policy trains on per step

  @property
  def model(self) -> float:
    """FLOPs the step needs (MFU counts these)."""
    return self.forward + self.input_grads + self.weight_grads + self.reference

  @property
  def hardware(self) -> float:
    """FLOPs the step executes, rematerialisation included."""
    return self.model + self.recompute


def _keys_per_query(T: int, window: int) -> float:
  if window and window < T:
    return window - window * (window - 1) / (2 * T)
  return (T + 1) / 2


def step_flops(trainer) -> StepFlops:
  cfg, spec, labels, masks = trainer.cfg, trainer.spec, trainer.labels, trainer.row_masks
  m = cfg.model
  L, H = m.n_layers, m.n_heads
  T, B = cfg.data.seq_len, cfg.data.batch_size

  def size(name):
    return int(np.prod(spec.shapes[name].shape))

  names = [n for n in spec.names if not n.startswith(FROZEN_COPIES)]
  trains = lambda n: labels[n] == partition.TRAINABLE
  layer_mm = [n for n in names if n.startswith(partition.LAYERS_PREFIX) and n.endswith(_MATMUL_SUFFIXES)]
  head_mm = [n for n in names if n.startswith('lm_head.') and n.endswith(_MATMUL_SUFFIXES)]
  if m.tie_embeddings:
    head_mm.append('embed')
  layer_params = sum(size(n) for n in layer_mm) / L  # per layer
  head_params = sum(size(n) for n in head_mm)
  qk_dim, v_dim = attention_head_dims(m)  # K and K, or MLA's own
  attention_fwd = 2 * H * (qk_dim + v_dim) * _keys_per_query(T, m.sliding_window)  # per layer per token

  # The lowest layer whose activations need a gradient: below it only the forward runs.
  layer_trains = [False] * L
  for n in names:
    if n.startswith(partition.LAYERS_PREFIX) and trains(n):
      rows = masks.get(n, np.ones(L, bool))
      layer_trains = [a or bool(r) for a, r in zip(layer_trains, rows)]
  if trains('embed') and not m.tie_embeddings:
    first_backward = 0
  elif any(layer_trains):
    first_backward = layer_trains.index(True)
  else:
    first_backward = L
  below_head = first_backward < L or trains('final_norm.scale') or (m.tie_embeddings and trains('embed'))
  backward_layers = L - first_backward

  forward = 2 * head_params + L * (2 * layer_params + attention_fwd)
  input_grads = (2 * head_params if below_head else 0) + backward_layers * (
      2 * layer_params + 2 * attention_fwd)
  weight_grads = 2 * sum(size(n) for n in head_mm if trains(n))
  weight_grads += 2 * sum(size(n) for n in layer_mm if trains(n))  # stacked: every row's gradient
  recompute_per_layer = {'none': 0.0, 'dots': 0.0, 'dots_no_batch': attention_fwd,
                         'full': 2 * layer_params + attention_fwd}[m.remat]
  recompute = backward_layers * recompute_per_layer

  sequences = 2 if cfg.train.objective == 'dpo' else 1  # chosen and rejected rows
  tokens = sequences * B * T
  reference = 0.0
  if cfg.train.objective == 'dpo':
    base_layer = sum(size(n) for n in layer_mm if n.endswith('.kernel')) / L
    base_head = sum(size(n) for n in head_mm if not n.endswith(('.lora_a', '.lora_b')))
    reference = tokens * (2 * base_head + L * (2 * base_layer + attention_fwd))
  return StepFlops(forward * tokens, input_grads * tokens, weight_grads * tokens, reference,
                   recompute * tokens, tokens)
