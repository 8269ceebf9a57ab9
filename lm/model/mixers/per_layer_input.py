"""Gemma 4's per-layer parts beside the two mixers: the per-layer input and the layer scale.

Per-layer input embeddings (`model.per_layer_input_dim` P > 0): besides the token embedding, each
token has a second embedding of n_layers x P numbers, mixed with a projection of the token
embedding (lm/model/transformer.py) and handed to layer i as its row [B, T, P]. After the
channel mixer's residual, the layer adds norm(proj(act(gate(x)) * row)): a gate D -> P and a
projection P -> D per layer. `model.layer_scale`: the layer's output times one learned scalar.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from lm.model.layers import ACTIVATIONS, Linear, RMSNorm


class PerLayerInput(nnx.Module):
  """(x_BTD, row_BTP) -> the residual update [B, T, D]."""

  stack_name = 'per_layer_input'

  def __init__(self, cfg, *, rngs):
    D, P = cfg.d_model, cfg.per_layer_input_dim
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    self.gate = lin((D,), (P,), ('embed',), (None,), name='layers.per_layer_input.gate')
    self.proj = lin((P,), (D,), (None,), ('embed',), name='layers.per_layer_input.proj')
    self.norm = RMSNorm(D, cfg=cfg, rngs=rngs)
    self.activation = cfg.mlp_activation

  def __call__(self, x_BTD, row_BTP):
    h_BTP = ACTIVATIONS[self.activation](self.gate(x_BTD)) * row_BTP.astype(x_BTD.dtype)
    return self.norm(self.proj(h_BTP))


class LayerScale(nnx.Module):
  """x times a learned scalar (Gemma 4's layer_scalar, one per layer)."""

  stack_name = 'layer_scale'

  def __init__(self, cfg, *, rngs):
    del rngs
    self.scale = nnx.Param(jnp.ones((1,), jnp.dtype(cfg.param_dtype)), out_sharding=(None,),
                           eager_sharding=False)

  def __call__(self, x_BTD):
    return x_BTD * self.scale[...].astype(x_BTD.dtype)
