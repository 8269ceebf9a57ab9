"""The layer stack built from parts (lm/model/stack.py): how layer kinds group into scanned
segments, that the stacks compile as one loop per segment, that scanning equals unrolling for a
mixed stack, and which model layer each parameter row is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm import config as config_lib
from lm.errors import ConfigError
from lm.model import stack
from lm.train import objectives
from lm.train.state import ModelSpec


def _segments(kinds):
  return [(s.start, s.period, s.repeats) for s in stack.segments(list(kinds))]


def test_layer_kinds_cut_into_repeating_groups():
  assert _segments('aaaa') == [(0, 1, 4)]
  assert _segments('lllflllflllf') == [(0, 4, 3)]  # Qwen3.5: 3 linear : 1 full, one group of 4
  assert _segments('dddmmmmm') == [(0, 1, 3), (3, 1, 5)]  # DeepSeek: first dense, then MoE
  assert _segments('dmdmdm') == [(0, 2, 3)]  # Llama 4: MoE every other layer
  assert _segments('lllflllfll') == [(0, 4, 2), (8, 1, 2)]  # a pattern cut short


def _moe_mixed(n_layers=8, **fields):
  mlp = ('dense', 'moe') * (n_layers // 2)
  c = tiny_config(n_layers=n_layers, mlp_types=mlp, **fields)
  c.model.moe.update(n_experts=4, experts_per_token=2, expert_dim=16)
  return c


def _loops(c):
  """while loops in the lowered forward (shapes only: nothing is initialised or compiled)."""
  spec = ModelSpec(c.model)
  params = jax.eval_shape(lambda: spec.init(jax.random.key(0)))
  tokens = np.zeros((1, 16), np.int32)
  return jax.jit(lambda p: spec.bind(p)(tokens)).lower(params).as_text().count('stablehlo.while')


def test_a_mixed_stack_compiles_as_one_loop_per_segment():
  assert _loops(_moe_mixed(8)) == 1  # dense/MoE pairs: one scan over 4 groups of 2 layers
  c = tiny_config(n_layers=8, mlp_types=('dense',) * 2 + ('moe',) * 6)
  c.model.moe.update(n_experts=4, experts_per_token=2, expert_dim=16)
  assert _loops(c) == 2  # first dense layers, then MoE ones
  assert _loops(tiny_config(n_layers=8)) == 1
  assert _loops(tiny_config(n_layers=8, scan_layers=False)) == 0


def _hybrid(n_layers):
  return tiny_config(n_layers=n_layers, layer_types=('linear', 'linear', 'linear', 'full') * (n_layers // 4),
                     linear_attn=dict(n_key_heads=2, n_value_heads=4, key_head_dim=8,
                                      value_head_dim=8, conv_kernel=4))


def test_a_hybrid_stack_compiles_to_the_same_program_size_at_any_depth():
  """Qwen3.5's 3 gated DeltaNet : 1 attention: one scan over groups of 4, so 8 or 16 layers lower
  to the same loops (the stack's one, and each DeltaNet layer's chunk loops inside its body)."""
  loops = _loops(_hybrid(8))
  assert loops == _loops(_hybrid(16))
  assert loops < _loops(_unrolled(_hybrid(8)))  # unrolled, every layer's loops are separate


def _unrolled(c):
  c.model.scan_layers = False
  return c


def test_parameter_rows_name_their_model_layers():
  c = _moe_mixed(6)
  spec = ModelSpec(c.model)
  assert spec.shapes['layers.mlp.gate.kernel'].shape == (3, 32, 64)  # the dense layers only
  assert spec.shapes['layers.moe.gate.kernel'].shape == (3, 4, 32, 16)
  assert spec.shapes['layers.attn_norm.scale'].shape == (6, 32)
  assert stack.layer_rows(spec.cfg, 'layers.mlp.gate.kernel') == (0, 2, 4)
  assert stack.layer_rows(spec.cfg, 'layers.moe.router') == (1, 3, 5)
  assert stack.layer_rows(spec.cfg, 'layers.attn.q.kernel') == tuple(range(6))
  assert stack.layer_rows(spec.cfg, 'embed') is None


@pytest.mark.parametrize('fields', [
    dict(),  # dense and MoE layers interleaved
    dict(layer_types=('sliding', 'chunked') * 2, sliding_window=4,
         attention_chunk_size=8, rope_layers=(1, 0) * 2, partial_rotary_factor=0.5,
         attn_output_gate=True, norm_placement='post', qk_norm=True, qk_norm_scope='all'),
])
def test_mixed_stack_scanned_equals_unrolled_with_gradients(fields):
  c = _moe_mixed(4, remat='full', **fields)  # one scanned segment: (dense, MoE) twice
  batch = random_batch(c, docs_per_row=2)
  results = []
  for scan in (True, False):
    c.model.scan_layers = scan
    spec = ModelSpec(c.model)
    params = spec.init(jax.random.key(0))
    loss = lambda p, spec=spec: objectives.next_token_xent(spec.bind(p), batch)[0]
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss_scan, grad_scan), (loss_unrolled, grad_unrolled) = results
  np.testing.assert_allclose(loss_scan, loss_unrolled, rtol=1e-6)
  for name in grad_scan:
    np.testing.assert_allclose(grad_scan[name], grad_unrolled[name], atol=1e-5, err_msg=name)
    assert float(jnp.max(jnp.abs(grad_scan[name]))) > 0, name  # every part is in the function


def test_chunked_attention_sees_only_its_own_chunk():
  c = tiny_config(layer_types=('chunked', 'chunked'), attention_chunk_size=8, n_layers=2)
  spec = ModelSpec(c.model)
  params = spec.init(jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 128)
  grad = jax.grad(lambda x: spec.bind(params)(x.astype(jnp.int32))[0, 12].sum(), allow_int=True)
  # Position 12 is in the chunk [8, 16): the logits there do not depend on tokens before 8.
  logits = lambda t: spec.bind(params)(t)[0, 12]
  changed = tokens.at[0, :8].set((tokens[0, :8] + 1) % 128)
  np.testing.assert_allclose(logits(tokens), logits(changed), atol=1e-6)
  assert float(jnp.max(jnp.abs(logits(tokens) - logits(tokens.at[0, 9].add(1))))) > 1e-4
  del grad


@pytest.mark.parametrize('fields, match', [
    (dict(layer_types=('full', 'mamba')), r"model.layer_types entry 'mamba' is not supported; lm "
                                          r"implements full, sliding, chunked, linear"),
    (dict(layer_types=('full',)), 'model.layer_types has 1 entries for 2 layers'),
    (dict(mlp_types=('dense', 'moe')), "'moe' layers but model.moe.n_experts is 0"),
    (dict(layer_types=('chunked', 'full')), 'attention_chunk_size is 0'),
    (dict(layer_types=('linear', 'full')), "model.linear_attn's head counts"),
    (dict(rope_layers=(1, 2)), "model.rope_layers entry 2 is not supported"),
    (dict(norm_placement='middle'), 'choose pre, sandwich or post'),
])
def test_unsupported_layer_kinds_are_one_line_errors(fields, match):
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(tiny_config(**fields))
