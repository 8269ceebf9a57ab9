"""The Gated DeltaNet mixer (lm.model.mixers.gated_deltanet) against transformers' Qwen3-Next and
Qwen3.5 modules with the same random weights, copied in through `hf_tensors`; cached decoding ==
the uncached forward; packed documents == documents alone.

Tolerance: 1e-4 absolute in float32 on outputs of unit scale (observed: see the printed errors;
the two sides differ only in summation order and in lm's chunked vs transformers' solve).
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from lm import config as config_lib
from lm.model.mixers import gated_deltanet as gdn

D, G, H, K, V, W = 32, 2, 4, 16, 8, 4
TOL = 1e-4


def model_cfg(**linear_attn):
  cfg = ml_collections.ConfigDict(config_lib.model_config('tiny').to_dict())
  cfg.d_model = D
  cfg.linear_attn = dict(n_key_heads=G, n_value_heads=H, key_head_dim=K, value_head_dim=V,
                         conv_kernel=W, **linear_attn)
  return cfg


def ctx(x_BTD, segment_ids_BT=None):
  """What the stack passes every token mixer (the mixer reads only the segment ids)."""
  positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
  return types.SimpleNamespace(positions_BT=positions_BT, segment_ids_BT=segment_ids_BT, layer={})


@nnx.jit
def forward(mixer, x_BTD, segment_ids_BT=None, cache=None):
  return mixer(x_BTD, ctx(x_BTD, segment_ids_BT), cache)


def params(module):
  """{dotted name: array} of the mixer's parameters."""
  return {'.'.join(map(str, path)): np.asarray(v[...])
          for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def load(module, named):
  """Sets the mixer's parameters from {dotted name: array}."""
  state = nnx.state(module, nnx.Param)
  for path, v in nnx.to_flat_state(state):
    v.set_value(jnp.asarray(named['.'.join(map(str, path))]))
  nnx.update(module, state)


HF_CLASSES = {'qwen3_next': ('Qwen3NextConfig', 'Qwen3NextGatedDeltaNet'),
              'qwen3_5': ('Qwen3_5TextConfig', 'Qwen3_5GatedDeltaNet')}


def hf_module(family):
  torch = pytest.importorskip('torch')
  configuration = pytest.importorskip(f'transformers.models.{family}.configuration_{family}')
  modeling = pytest.importorskip(f'transformers.models.{family}.modeling_{family}')
  config_name, module_name = HF_CLASSES[family]
  config, cls = getattr(configuration, config_name), getattr(modeling, module_name)
  hf_cfg = config(hidden_size=D, linear_num_key_heads=G, linear_num_value_heads=H,
                  linear_key_head_dim=K, linear_value_head_dim=V, linear_conv_kernel_dim=W,
                  num_hidden_layers=1, layer_types=['linear_attention'], rms_norm_eps=1e-5)
  torch.manual_seed(0)
  module = cls(hf_cfg, layer_idx=0).float().eval()
  with torch.no_grad():  # every tensor random, the norm weight and dt_bias away from their init
    for p in module.parameters():
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5))
  return torch, module


def from_hf(family, hf_state, cfg):
  named = {}
  for names, (hf_name, to_lm, _) in gdn.hf_tensors(family, cfg).items():
    values = to_lm(hf_state[hf_name])
    if isinstance(names, str):
      names, values = (names,), (values,)
    named.update(zip(names, values))
  return named


@pytest.mark.parametrize('family', ['qwen3_next', 'qwen3_5'])
def test_matches_transformers(family):
  """The same weights give the same outputs; lm -> HF gives back every HF tensor bit for bit."""
  torch, hf = hf_module(family)
  hf_state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  cfg = model_cfg()
  mixer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
  named = from_hf(family, hf_state, cfg)
  assert set(named) == set(params(mixer))  # every parameter mapped, nothing extra
  load(mixer, named)
  for names, (hf_name, _, to_hf) in gdn.hf_tensors(family, cfg).items():
    names = (names,) if isinstance(names, str) else names
    np.testing.assert_array_equal(to_hf(*(named[n] for n in names)), hf_state[hf_name])
  x_BTD = np.random.default_rng(0).normal(size=(2, 100, D)).astype(np.float32)
  with torch.no_grad():
    want = hf(torch.from_numpy(x_BTD)).numpy()
  got, cache = forward(mixer, jnp.asarray(x_BTD))
  assert cache is None and got.shape == (2, 100, D)
  err = float(np.max(np.abs(np.asarray(got) - want)))
  print(f'{family}: lm vs transformers max |dy| {err:.1e} (|y| max {np.max(np.abs(want)):.2f})')
  assert err < TOL


def test_cached_decoding_matches_forward():
  """Prefill 37 tokens, then one token at a time (conv and state carried in the cache), then
  two at once: equal to the uncached forward over the whole sequence."""
  cfg = model_cfg()
  mixer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(1))
  x_BTD = jax.random.normal(jax.random.key(2), (2, 43, D))
  want, _ = forward(mixer, x_BTD)
  cache = gdn.GatedDeltaNet.init_cache(cfg, 2, dtype=jnp.float32)
  assert cache['conv'].shape == (2, 2 * G * K + H * V, W - 1)
  assert cache['state'].shape == (2, H, K, V) and cache['state'].dtype == jnp.float32
  outs = []
  for start, end in [(0, 37), *((t, t + 1) for t in range(37, 41)), (41, 43)]:
    y, cache = forward(mixer, x_BTD[:, start:end], None, cache)
    outs.append(y)
  err = float(jnp.max(jnp.abs(jnp.concatenate(outs, axis=1) - want)))
  print(f'cached vs uncached: {err:.1e}')
  assert err < 1e-5


@pytest.mark.parametrize('prompt', [2, 20])
def test_left_padded_row_decodes_as_alone(prompt):
  """lm.eval.generate left-pads prompts with segment id 0: the padded row's prefill and next
  steps equal the unpadded row's, also when the prompt is shorter than the conv's reach."""
  cfg = model_cfg()
  mixer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(5))
  pad, steps = 5, 2
  x_BTD = jax.random.normal(jax.random.key(6), (1, pad + prompt + steps, D))  # pads not zero
  seg = jnp.asarray([[0] * pad + [1] * prompt])
  empty = gdn.GatedDeltaNet.init_cache(cfg, 1, dtype=jnp.float32)
  padded, cache_p = forward(mixer, x_BTD[:, :pad + prompt], seg, empty)
  alone, cache_a = forward(mixer, x_BTD[:, pad:pad + prompt], seg[:, pad:], empty)
  np.testing.assert_allclose(padded[:, pad:], alone, atol=1e-5)
  for t in range(pad + prompt, pad + prompt + steps):
    (y_p, cache_p), (y_a, cache_a) = (forward(mixer, x_BTD[:, t:t + 1], seg[:, -1:], c)
                                      for c in (cache_p, cache_a))
    np.testing.assert_allclose(y_p, y_a, atol=1e-5)


def test_bfloat16_compute():
  """bf16 weights and activations (the state stays float32) against float32, same weights."""
  got, weights = {}, None
  for dtype in ('float32', 'bfloat16'):
    cfg = model_cfg()
    cfg.update(param_dtype=dtype, compute_dtype=dtype)
    mixer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(7))
    weights = weights or params(mixer)
    load(mixer, {k: jnp.asarray(w, dtype) for k, w in weights.items()})
    x_BTD = jax.random.normal(jax.random.key(8), (1, 40, D)).astype(dtype)
    y, cache = forward(mixer, x_BTD, None, gdn.GatedDeltaNet.init_cache(cfg, 1, dtype=dtype))
    assert y.dtype == jnp.dtype(dtype) and cache['state'].dtype == jnp.float32
    got[dtype] = y.astype(jnp.float32)
  err = float(jnp.max(jnp.abs(got['bfloat16'] - got['float32'])))
  print(f'bf16 vs f32: max |dy| {err:.1e} (|y| max {float(jnp.max(jnp.abs(got["float32"]))):.2f})')
  assert err < 0.1  # observed 5.0e-2 at |y| <= 2.95: a few bf16 roundings (2^-8) on the way


def test_packed_equals_separate():
  """A packed row == each document alone: neither the conv nor the state crosses a boundary,
  and padding outputs zeros."""
  mixer = gdn.GatedDeltaNet(model_cfg(), rngs=nnx.Rngs(3))
  lengths = [(1, 40), (2, 3), (3, 20), (0, 7)]  # a 3-token document: shorter than the conv
  seg = jnp.asarray(np.concatenate([np.full(n, i) for i, n in lengths])[None], jnp.int32)
  x_BTD = jax.random.normal(jax.random.key(4), (1, seg.shape[1], D))
  got, _ = forward(mixer, x_BTD, seg)
  start = 0
  for doc, n in lengths:
    part = got[:, start:start + n]
    if doc:
      alone, _ = forward(mixer, x_BTD[:, start:start + n])
      np.testing.assert_allclose(part, alone, atol=1e-5)
    else:
      np.testing.assert_array_equal(part, 0.0)
    start += n


def test_parameters_and_names():
  """Logical axes as the mesh rules expect, and LoRA reaches the projections by name."""
  cfg = model_cfg()
  cfg.lora.update(rank=2, targets=r'layers\.linear_attn\.(q|v|o)$')
  mixer = gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
  axes = {'.'.join(map(str, p)): v.get_metadata().get('out_sharding')
          for p, v in nnx.to_flat_state(nnx.state(mixer, nnx.Param))}
  assert axes['q.kernel'] == ('embed', 'kv_heads', 'head_dim')
  assert axes['v.kernel'] == ('embed', 'heads', 'head_dim')
  assert axes['o.kernel'] == ('heads', 'head_dim', 'embed')
  assert axes['conv_v'] == (None, 'heads', 'head_dim') and axes['A_log'] == ('heads',)
  assert axes['norm.scale'] == ('head_dim',)
  assert [n for n in ('q', 'k', 'v', 'z', 'b', 'a', 'o') if getattr(mixer, n).lora_rank] == [
      'q', 'v', 'o']
  np.testing.assert_array_equal(mixer.norm.scale[...], 1.0)  # gated norm: weight starts at 1


def test_refuses_ungrouped_heads():
  cfg = model_cfg()
  cfg.linear_attn.n_value_heads = 3
  with pytest.raises(ValueError, match='multiple'):
    gdn.GatedDeltaNet(cfg, rngs=nnx.Rngs(0))
