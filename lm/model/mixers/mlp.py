"""The dense channel mixer: a gated MLP, down(act(gate(x)) * up(x)); SwiGLU with silu (Llama),
GeGLU with gelu_tanh (Gemma)."""

from __future__ import annotations

import functools

from flax import nnx

from lm.model.layers import ACTIVATIONS, Linear


class MLP(nnx.Module):

  stack_name = 'mlp'

  def __init__(self, cfg, *, rngs):
    D, F = cfg.d_model, cfg.mlp_dim
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    bias = cfg.mlp_bias
    self.gate = lin((D,), (F,), ('embed',), ('mlp',), use_bias=bias, name='layers.mlp.gate')
    self.up = lin((D,), (F,), ('embed',), ('mlp',), use_bias=bias, name='layers.mlp.up')
    self.down = lin((F,), (D,), ('mlp',), ('embed',), use_bias=bias, name='layers.mlp.down')
    self.activation = cfg.mlp_activation

  def __call__(self, x_BTD, ctx):
    del ctx
    return self.down(ACTIVATIONS[self.activation](self.gate(x_BTD)) * self.up(x_BTD)), None
