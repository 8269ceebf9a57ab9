"""The dense channel mixer: a gated MLP, down(act(gate(x)) * up(x)); SwiGLU with silu (Llama),
GeGLU with gelu_tanh (Gemma). `WideMLP`: the same on `model.wide_mlp_dim` hidden units, for the
'wide' layers of `model.mlp_types` (Gemma 4's KV-shared layers with use_double_wide_mlp)."""

from __future__ import annotations

import functools

from flax import nnx

from lm.model.layers import ACTIVATIONS, Linear


class MLP(nnx.Module):

  stack_name = 'mlp'

  def __init__(self, cfg, *, rngs, hidden: int = 0, name: str = 'layers.mlp', bias=None):
    """`hidden`, `name`, `bias`: another size, LoRA target name and bias choice than the dense
    layers' (a Mixture-of-Experts layer's shared expert is one of these)."""
    D, F = cfg.d_model, hidden or cfg.mlp_dim
    lin = functools.partial(Linear, cfg=cfg, rngs=rngs)
    bias = cfg.mlp_bias if bias is None else bias
    self.gate = lin((D,), (F,), ('embed',), ('mlp',), use_bias=bias, name=name + '.gate')
    self.up = lin((D,), (F,), ('embed',), ('mlp',), use_bias=bias, name=name + '.up')
    self.down = lin((F,), (D,), ('mlp',), ('embed',), use_bias=bias, name=name + '.down')
    self.activation = cfg.mlp_activation

  def __call__(self, x_BTD, ctx):
    del ctx
    return self.down(ACTIVATIONS[self.activation](self.gate(x_BTD)) * self.up(x_BTD)), None


class WideMLP(MLP):

  stack_name = 'mlp_wide'

  def __init__(self, cfg, *, rngs):
    super().__init__(cfg, rngs=rngs, hidden=cfg.wide_mlp_dim, name='layers.mlp_wide')
