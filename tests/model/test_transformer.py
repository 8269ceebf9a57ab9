import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.train import objectives
from lm import config as config_lib
from lm.model.transformer import UNROLL_MAX_LAYERS, rope_frequencies, scans_layers
from lm.train.state import ModelSpec


def _model(c, seed=0):
  spec = ModelSpec(c.model)
  return spec, spec.init(jax.random.key(seed))


def _loss(spec, params, batch):
  loss_sum, weight_sum, _ = objectives.next_token_xent(spec.bind(params), batch)
  return loss_sum / weight_sum


def test_loss_at_init_is_log_vocab(cfg):
  cfg.model.vocab_size = 512
  spec, params = _model(cfg)
  loss = _loss(spec, params, random_batch(cfg))
  assert abs(float(loss) - np.log(512)) < 0.05


def test_causal_gradient_of_position_t_ignores_later_inputs(cfg):
  spec, params = _model(cfg)
  model = spec.bind(params)
  batch = random_batch(cfg)
  x = jnp.take(params['embed'], batch['tokens'], axis=0)
  t = 6

  def loss_at_t(x_embedded):
    # Feed embeddings directly by swapping the embedding table for an identity lookup.
    p = dict(params)
    p['embed'] = x_embedded.reshape(-1, x_embedded.shape[-1])
    rows = jnp.arange(x_embedded.shape[0] * x_embedded.shape[1]).reshape(x_embedded.shape[:2])
    logits = spec.bind(p)(rows, batch['positions'], batch['segment_ids'])
    return jnp.sum(logits[:, t])

  del model
  grad = jax.grad(loss_at_t)(x)
  per_position = np.abs(np.asarray(grad)).sum(axis=(0, 2))
  assert np.all(per_position[t + 1:] == 0.0)
  assert np.all(per_position[:t + 1] > 0.0)


def test_packed_documents_do_not_attend_across(cfg):
  spec, params = _model(cfg)
  model = spec.bind(params)
  batch = random_batch(cfg, docs_per_row=2)
  T = cfg.data.seq_len
  changed = batch['tokens'].copy()
  changed[:, : T // 2] = (changed[:, : T // 2] + 1) % cfg.model.vocab_size  # rewrite document 1
  a = model(batch['tokens'], batch['positions'], batch['segment_ids'])
  b = model(changed, batch['positions'], batch['segment_ids'])
  np.testing.assert_array_equal(np.asarray(a[:, T // 2:]), np.asarray(b[:, T // 2:]))
  assert not np.allclose(a[:, : T // 2], b[:, : T // 2])
  # A document's second half sees the same logits as the document alone at positions 0..
  alone = model(batch['tokens'][:, T // 2:], batch['positions'][:, T // 2:],
                batch['segment_ids'][:, T // 2:])
  np.testing.assert_allclose(np.asarray(alone), np.asarray(a[:, T // 2:]), atol=1e-5)


@pytest.mark.parametrize('option', [dict(scan_layers=False), dict(remat='full'), dict(remat='dots')])
def test_scan_unroll_and_remat_compute_the_same_function(option):
  c = tiny_config()
  spec, params = _model(c)
  other = ModelSpec(tiny_config(**option).model)
  batch = random_batch(c)
  g1 = jax.grad(lambda p: _loss(spec, p, batch))(params)
  g2 = jax.grad(lambda p: _loss(other, p, batch))(params)
  for k in g1:
    np.testing.assert_allclose(g1[k], g2[k], rtol=1e-5, atol=1e-6)


def test_shallow_stacks_unroll_by_default_and_deep_ones_scan():
  for n, scan in ((1, False), (UNROLL_MAX_LAYERS, False), (UNROLL_MAX_LAYERS + 1, True), (32, True)):
    assert scans_layers(tiny_config(n_layers=n, scan_layers=None).model) is scan
  assert scans_layers(tiny_config(n_layers=2, scan_layers=True).model) is True
  assert scans_layers(tiny_config(n_layers=32, scan_layers=False).model) is False
  assert config_lib.base_config().model.scan_layers is None


def test_configured_variants_change_the_parameter_set():
  qwen = ModelSpec(tiny_config(qkv_bias=True, tie_embeddings=True).model)
  assert 'layers.attn.q.bias' in qwen.shapes and 'lm_head.kernel' not in qwen.shapes
  assert qwen.shapes['layers.attn.k.bias'].shape == (2, 2, 8)  # layers, kv heads, head dim
  llama = ModelSpec(tiny_config().model)
  assert 'layers.attn.q.bias' not in llama.shapes and 'lm_head.kernel' in llama.shapes
  assert llama.logical_axes['layers.mlp.gate.kernel'] == ('layers', 'embed', 'mlp')


def test_bf16_compute_keeps_fp32_params_and_close_logits(cfg):
  spec, params = _model(cfg)
  bf16 = ModelSpec(tiny_config(compute_dtype='bfloat16').model)
  batch = random_batch(cfg)
  assert all(v.dtype == jnp.float32 for v in params.values())
  a = spec.bind(params)(batch['tokens'])
  b = bf16.bind(params)(batch['tokens'])
  assert b.dtype == jnp.float32
  np.testing.assert_allclose(a, b, atol=0.05)


def test_llama3_rope_scaling_matches_reference_formula():
  c = tiny_config(rope_theta=500000.0)
  c.model.rope_scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                              original_max_seq_len=8192)
  c.model.head_dim = 128
  scaled = np.asarray(rope_frequencies(c.model))
  base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
  wavelen = 2 * np.pi / base
  # Long wavelengths are divided by the factor, short ones untouched, the band between blended.
  np.testing.assert_allclose(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4], rtol=1e-6)
  np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8, rtol=1e-6)
  mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
  assert np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 8)
