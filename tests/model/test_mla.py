"""Multi-head latent attention (lm/model/mixers/mla.py): decoding from the cached latents equals
the uncached forward, the cache holds only the latents, documents stay apart, FLOPs count every
projection, and MLA dims that cannot work are one-line config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from lm import config as config_lib
from lm.errors import ConfigError
from lm.model import transformer
from lm.train import flops
from lm.train.state import ModelSpec

# DeepSeek-V3's MLA proportions, shrunk: latent 16, nope 8, rope 4, value 6 (values narrower
# than queries/keys, as in DeepSeek where 128 < 192).
MLA = dict(kv_lora_rank=16, q_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
YARN = {'type': 'yarn', 'factor': 4.0, 'original_max_seq_len': 16, 'mscale': 1.0,
        'mscale_all_dim': 0.7}


def mla_config(**extra):
  mla = dict(MLA, **extra.pop('mla', {}))
  c = tiny_config(**extra)
  c.model.mla.update(mla)
  return c


def random_params(spec, seed=0):
  """Fresh parameters with every LoRA B random too, so adapters take part, and a larger lm_head,
  so the logits spread (std ~1) and a wrong attention would show."""
  params = spec.init(jax.random.key(seed))
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(params)))
  return {n: 0.2 * jax.random.normal(next(keys), v.shape) if n.endswith('lora_b') else
          10 * v if n == 'lm_head.kernel' else v for n, v in params.items()}


def decode_stepwise(spec, params, tokens_BT, prompt: int):
  """Logits [B, T, V] from a cached prefill of `prompt` tokens, then one token per call (one
  compiled step for all of them)."""
  B, T = tokens_BT.shape

  @jax.jit
  def call(params, tokens_Bt, start, cache):
    positions = start + jnp.broadcast_to(jnp.arange(tokens_Bt.shape[1]), tokens_Bt.shape)
    put = lambda a, new: jax.lax.dynamic_update_slice_in_dim(a, new, start, axis=1)
    cache = {**cache, 'index': start, 'positions': put(cache['positions'], positions),
             'segment_ids': put(cache['segment_ids'], jnp.ones_like(positions))}
    return spec.bind(params)(tokens_Bt, positions, jnp.ones_like(positions), cache)

  cache = transformer.init_cache(spec.cfg, B, T)
  outs = []
  for start, end in [(0, prompt)] + [(t, t + 1) for t in range(prompt, T)]:
    logits, cache = call(params, tokens_BT[:, start:end], jnp.int32(start), cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize('variant', ['low_rank_q', 'direct_q_interleaved_yarn', 'sliding_lora'])
def test_cached_decoding_equals_uncached_forward(variant):
  extra = {
      'low_rank_q': {},
      'direct_q_interleaved_yarn': dict(mla=dict(q_lora_rank=0), rope_interleaved=True,
                                        rope_scaling=YARN),
      # A window shorter than the sequence on one layer, and LoRA on every projection: the
      # absorbed decode must fold kv_b's adapter in.
      'sliding_lora': dict(layer_types=('sliding', 'full'), sliding_window=5),
  }[variant]
  c = mla_config(**extra)
  if variant == 'sliding_lora':
    c.model.lora.update(rank=2, alpha=4.0)
  spec = ModelSpec(c.model)
  if variant == 'sliding_lora':
    assert 'layers.attn.kv_b.lora_b' in spec.shapes
  params = random_params(spec)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 12)), jnp.int32)
  full = jax.jit(lambda p: spec.bind(p)(tokens))(params)
  cached, cache = decode_stepwise(spec, params, tokens, prompt=5)
  error = float(jnp.max(jnp.abs(cached - full)))
  print(f'{variant}: max |cached - uncached logit| {error:.2e} (logit std {float(jnp.std(full)):.2f})')
  assert error <= 1e-5 and float(jnp.std(full)) > 0.5
  # The cache is the latent and the shared rotated key: nothing per head.
  C, P = MLA['kv_lora_rank'], MLA['qk_rope_head_dim']
  assert {k: v.shape for k, v in cache['layers']['attn'].items()} == {
      'latent': (2, 2, 12, C), 'k_rope': (2, 2, 12, P)}


def test_cache_per_token_is_the_latent_not_full_keys_and_values():
  """Per token and layer the cache holds C + P numbers; per-head K/V would be H·(Q + V)."""
  c = mla_config()
  cache = transformer.init_cache(c.model, 1, 1)['layers']['attn']
  per_token = sum(int(np.prod(a.shape[1:])) for a in cache.values())  # one layer's, B = S = 1
  H, a = c.model.n_heads, c.model.mla
  full_kv = H * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
  print(f'cache per token per layer: {per_token} (latent) vs {full_kv} (full K/V)')
  assert per_token == a.kv_lora_rank + a.qk_rope_head_dim < full_kv
  assert transformer.cache_logical_axes(c.model)['layers']['attn'] == {
      'latent': ('layers', 'batch', 'length', 'latent'),
      'k_rope': ('layers', 'batch', 'length', 'head_dim')}


def test_packed_documents_do_not_attend_across():
  c = mla_config()
  spec = ModelSpec(c.model)
  params = spec.init(jax.random.key(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (1, 16)), jnp.int32)
  segments = jnp.asarray([[1] * 7 + [2] * 9])
  positions = jnp.asarray([list(range(7)) + list(range(9))])
  packed = spec.bind(params)(tokens, positions, segments)
  second = spec.bind(params)(tokens[:, 7:])
  np.testing.assert_allclose(packed[:, 7:], second, atol=1e-5)


def test_scan_and_unrolled_layers_agree_with_gradients():
  results = []
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 128, (2, 8)), jnp.int32)
  for scan in (True, False):
    spec = ModelSpec(mla_config(scan_layers=scan).model)
    params = spec.init(jax.random.key(0))
    loss = lambda p, spec=spec: jnp.mean(jax.nn.log_softmax(spec.bind(p)(tokens))[..., 0])
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (loss_a, grad_a), (loss_b, grad_b) = results
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for name in grad_a:
    np.testing.assert_allclose(grad_a[name], grad_b[name], atol=1e-6, err_msg=name)
  assert float(jnp.max(jnp.abs(grad_a['layers.attn.kv_b.kernel']))) > 0


@pytest.mark.parametrize('q_lora_rank', [12, 0])
def test_flops_count_every_mla_projection(q_lora_rank):
  """matmul_params is the size of every matmul kernel (the embedding lookup excluded)."""
  c = mla_config(mla=dict(q_lora_rank=q_lora_rank))
  spec = ModelSpec(c.model)
  kernels = sum(int(np.prod(s.shape)) for n, s in spec.shapes.items() if n.endswith('.kernel'))
  assert {n for n in spec.shapes if n.startswith('layers.attn.')} == {
      f'layers.attn.{p}' for p in ((['q_a.kernel', 'q_a_norm.scale', 'q_b.kernel'] if q_lora_rank
                                   else ['q.kernel'])
                                  + ['kv_a.kernel', 'kv_a_norm.scale', 'kv_b.kernel', 'o.kernel'])}
  assert flops.matmul_params(c.model) == kernels
  # Attention scores: Q-wide dot products, V-wide weighted sums.
  T, L, H, a = 16, c.model.n_layers, c.model.n_heads, c.model.mla
  # (T + 1) / 2 keys per causal query on average, as lm plan counts them (flops.keys_per_query).
  per_key = a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim
  expected = 6.0 * kernels + 3.0 * L * (T + 1) * H * per_key
  assert flops.train_flops_per_token(c.model, T) == expected


@pytest.mark.parametrize('change, message', [
    (dict(mla=dict(qk_rope_head_dim=5)), r'^model.mla.qk_rope_head_dim=5: RoPE rotates pairs of dims'),
    (dict(mla=dict(v_head_dim=0)), r'^model.mla.v_head_dim=0: MLA needs a positive value head dim'),
    (dict(qk_norm=True), r'^model.qk_norm=True is not implemented with MLA'),
    (dict(mla=dict(kv_lora_rank=0)), r'^model.mla.q_lora_rank=12 has no effect while '
                                     r'model.mla.kv_lora_rank is 0'),
])
def test_mla_dims_that_cannot_work_are_one_line_errors(change, message):
  c = mla_config(**change)
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(c)
  if c.model.mla.kv_lora_rank:  # a model built without validation fails the same way
    with pytest.raises(ConfigError, match=message):
      ModelSpec(c.model)
