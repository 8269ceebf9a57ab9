"""Analytic FLOPs of one train step, per mode: what the step computes, counted from its shapes.
`lm plan` reports them and the training loop's MFU counts them (`batch_token_flops`).

A matmul weight of n parameters costs, per token, 2n in the forward pass, 2n for the gradient of
its input (only where something below it trains) and 2n for its own gradient (only if it
trains). So full training is ~6N per token, LoRA ~4N plus the adapters, and layers below the
lowest trainable one cost the forward only. Each layer's token mixer adds its own forward work
(lm.train.flops.token_mixer_flops: attention 2·H·(Kqk + Kv) per key, with MLA's head dims, a
causal query seeing (T+1)/2 keys on average, a window of w about w; a gated DeltaNet layer its
chunked delta rule, linear in T) and twice that backward. Rematerialisation recomputes, in the backward pass, the
forward work its policy did not save: `full` the whole layer, `dots_no_batch` the token mixers'
einsums (batch dims), `dots` nothing of note. DPO runs the policy on chosen and rejected rows
and the reference forward only. Packed segments are counted as full-length causal rows (an upper
bound).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lm.model import stack
from lm.model.spec import FROZEN_COPIES
from lm.train import partition
from lm.train.flops import token_mixer_flops

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


def step_flops(trainer) -> StepFlops:
  cfg, spec, labels, masks = trainer.cfg, trainer.spec, trainer.labels, trainer.row_masks
  m = cfg.model
  L = m.n_layers
  T, B = cfg.data.seq_len, cfg.data.batch_size

  def size(name):
    return int(np.prod(spec.shapes[name].shape))

  def per_layer(name):  # [L]: the parameter's size in each model layer (stacks: per row)
    out = np.zeros(L)
    rows = stack.layer_rows(m, name)
    np.add.at(out, np.asarray(rows), size(name) / len(rows))
    return out

  names = [n for n in spec.names if not n.startswith(FROZEN_COPIES)]
  trains = lambda n: labels[n] == partition.TRAINABLE
  layer_mm = [n for n in names if n.startswith(partition.LAYERS_PREFIX) and n.endswith(_MATMUL_SUFFIXES)]
  head_mm = [n for n in names if n.startswith('lm_head.') and n.endswith(_MATMUL_SUFFIXES)]
  if m.tie_embeddings:
    head_mm.append('embed')
  layer_params = sum((per_layer(n) for n in layer_mm), np.zeros(L))  # [L]
  head_params = sum(size(n) for n in head_mm)
  mixer_fwd = np.asarray(token_mixer_flops(m, T))  # [L] per token

  # The lowest layer whose activations need a gradient: below it only the forward runs.
  layer_trains = np.zeros(L, bool)
  for n in names:
    if n.startswith(partition.LAYERS_PREFIX) and trains(n):
      rows = np.asarray(stack.layer_rows(m, n))
      layer_trains[rows[masks[n]] if n in masks else rows] = True
  if trains('embed') and not m.tie_embeddings:
    first_backward = 0
  elif layer_trains.any():
    first_backward = int(np.argmax(layer_trains))
  else:
    first_backward = L
  below_head = first_backward < L or trains('final_norm.scale') or (m.tie_embeddings and trains('embed'))
  back = slice(first_backward, L)

  forward = 2 * head_params + np.sum(2 * layer_params + mixer_fwd)
  input_grads = (2 * head_params if below_head else 0) + np.sum(
      2 * layer_params[back] + 2 * mixer_fwd[back])
  weight_grads = 2 * sum(size(n) for n in head_mm if trains(n))
  weight_grads += 2 * sum(size(n) for n in layer_mm if trains(n))  # stacked: every row's gradient
  recompute_per_layer = {'none': 0 * mixer_fwd, 'dots': 0 * mixer_fwd, 'dots_no_batch': mixer_fwd,
                         'full': 2 * layer_params + mixer_fwd}[m.remat]
  recompute = np.sum(recompute_per_layer[back])

  sequences = 2 if cfg.train.objective == 'dpo' else 1  # chosen and rejected rows
  tokens = sequences * B * T
  reference = 0.0
  if cfg.train.objective == 'dpo':
    base_layers = sum(size(n) for n in layer_mm if n.endswith('.kernel'))
    base_head = sum(size(n) for n in head_mm if not n.endswith(('.lora_a', '.lora_b')))
    reference = tokens * (2 * base_head + 2 * base_layers + np.sum(mixer_fwd))
  return StepFlops(float(forward * tokens), float(input_grads * tokens),
                   float(weight_grads * tokens), float(reference), float(recompute * tokens), tokens)


def batch_token_flops(trainer) -> float:
  """FLOPs the step needs (StepFlops.model) per token of its batch (data.batch_size x
  data.seq_len): what the training loop's MFU multiplies its tokens/s by. A LoRA step needs about
  4N per token, not the 6N of full training (lm.train.flops.train_flops_per_token)."""
  data = trainer.cfg.data
  return step_flops(trainer).model / (data.batch_size * data.seq_len)
