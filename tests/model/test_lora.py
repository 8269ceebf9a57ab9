"""LoRA: step 0 is the base model, only adapters train, merge/unmerge, named adapters, PEFT files."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.io import peft as lm_peft
from lm.model import lora
from lm.model.adapter_set import AdapterSet
from lm.train import partition
from lm.train.state import ModelSpec
from lm.train.loop import Trainer


def lora_config(rank=4, **lora_fields):
  c = tiny_config()
  c.model.lora.update(rank=rank, alpha=8.0, **lora_fields)
  c.train.trainable = 'lora'
  return c


def forward(spec, params, tokens, rng=None, adapters=True):
  """Jitted: eager op-by-op dispatch of a whole model is slower than compiling it once."""
  return np.asarray(jax.jit(lambda p, r: spec.bind(p, rng=r)(tokens, adapters=adapters))(params, rng))


def with_random_b(params, seed=1):
  """Adapters as after some training: B no longer zero."""
  keys = iter(jax.random.split(jax.random.key(seed), len(params)))
  return {k: (0.3 * jax.random.normal(next(keys), v.shape) if k.endswith('lora_b') else v)
          for k, v in params.items()}


def test_step_zero_equals_base_model_exactly():
  c = lora_config()
  base_spec = ModelSpec(tiny_config().model)
  base = base_spec.init(jax.random.key(0))
  spec = ModelSpec(c.model)
  params = {**spec.init(jax.random.key(1)), **base}  # fresh adapters on the base weights
  assert {k for k in params if k not in base} == {
      f'layers.{m}.lora_{ab}' for m in ('attn.q', 'attn.k', 'attn.v', 'attn.o', 'mlp.gate',
                                        'mlp.up', 'mlp.down') for ab in 'ab'}
  tokens = random_batch(c)['tokens']
  np.testing.assert_array_equal(forward(spec, params, tokens), forward(base_spec, base, tokens))
  assert float(jnp.abs(params['layers.attn.q.lora_a']).max()) > 0  # A is random, B zero


def test_only_adapters_get_gradients_and_optimizer_state():
  c = lora_config()
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  before = jax.device_get(state.params)
  batch = trainer.global_batch(random_batch(c))
  for _ in range(2):
    state, metrics = trainer.step(state, batch)
  after = jax.device_get(state.params)
  for name in before:
    assert (not np.array_equal(before[name], after[name])) == partition.is_adapter(name), name
  moments = {getattr(p[-1], 'key', None) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)}
  assert moments - {None} == {n for n in before if partition.is_adapter(n)}
  assert 'trainable' in trainer.trainable_summary() and float(metrics['grad_norm']) > 0

  # Memory: the step's inputs are the weights, Adam's two moments of the adapters only, the batch
  # (and the guard's loss window).
  batch_bytes = sum(x.nbytes for x in jax.tree.leaves(batch))
  size = lambda names: sum(before[n].nbytes for n in names)
  adapters = [n for n in before if partition.is_adapter(n)]
  memory = trainer.step.lower(state, batch).compile().memory_analysis()
  guard_bytes = sum(x.nbytes for x in jax.tree.leaves(state.guard))  # numerical-guard window
  expected = size(before) + 2 * size(adapters) + batch_bytes + guard_bytes
  assert expected <= memory.argument_size_in_bytes <= expected + 256  # + step counters


def test_merge_equals_unmerged_forward_and_unmerge_restores_base():
  c = lora_config(rank=4, rslora=True, targets=r'attn\.(q|o)|mlp\.down|lm_head')
  spec = ModelSpec(c.model)
  params = with_random_b(spec.init(jax.random.key(0)))
  assert 'lm_head.lora_a' in params and 'layers.attn.k.lora_a' not in params
  tokens = random_batch(c)['tokens']
  adapted = forward(spec, params, tokens)
  base_spec = ModelSpec(lora.without_adapters(c.model))
  merged = lora.merge(params, c.model.lora)
  assert set(merged) == set(base_spec.names)
  np.testing.assert_allclose(forward(base_spec, merged, tokens), adapted, atol=2e-5)
  assert not np.allclose(forward(base_spec, lora.split(params)[0], tokens), adapted, atol=1e-3)
  restored = lora.unmerge(merged, lora.split(params)[1], c.model.lora)
  for k, v in lora.split(params)[0].items():
    np.testing.assert_allclose(restored[k], v, atol=1e-6)
  # Adapters switched off in the call give the base model (DPO's reference) without a copy.
  np.testing.assert_array_equal(forward(spec, params, tokens, adapters=False),
                                forward(base_spec, lora.split(params)[0], tokens))


def test_named_adapters_share_one_base():
  c = tiny_config()
  base = ModelSpec(c.model).init(jax.random.key(0))
  bank = AdapterSet(c.model, base)
  for name, rank, targets in (('small', 2, r'attn\.q'), ('wide', 8, r'mlp\.')):
    spec = ModelSpec(lora.with_adapters(c.model, dict(rank=rank, targets=targets)))
    adapter = lora.split(with_random_b(spec.init(jax.random.key(rank)), seed=rank))[1]
    bank.add(name, adapter, dict(rank=rank, targets=targets))
  tokens = random_batch(c)['tokens']
  outs = {n: forward(bank.spec(n), bank.params(n), tokens) for n in (None, 'small', 'wide')}
  assert not np.allclose(outs['small'], outs['wide']) and not np.allclose(outs[None], outs['wide'])
  assert bank.params('small')['embed'] is bank.params('wide')['embed'] is base['embed']
  np.testing.assert_array_equal(outs[None], forward(ModelSpec(c.model), base, tokens))


def test_adapter_dropout_only_in_training():
  c = lora_config(dropout=0.5)
  spec = ModelSpec(c.model)
  params = with_random_b(spec.init(jax.random.key(0)))
  tokens = random_batch(c)['tokens']
  plain = forward(spec, params, tokens)
  np.testing.assert_array_equal(plain, forward(spec, params, tokens))
  dropped = forward(spec, params, tokens, rng=jax.random.key(3))
  assert not np.allclose(plain, dropped)
  np.testing.assert_array_equal(dropped, forward(spec, params, tokens, rng=jax.random.key(3)))


# ----------------------------------------------------------------------------- PEFT interop


def test_peft_round_trip(tmp_path):
  torch = pytest.importorskip('torch')
  pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  from hf_util import TOKENS, hf_logits, make_hf_model

  from lm.io import hf
  base_hf = make_hf_model('llama2', tmp_path / 'base')
  c = tiny_config()
  c.model.update(hf.model_config_from_hf(hf.read_config(tmp_path / 'base')))
  c.model.lora.update(rank=4, alpha=8.0, rslora=True, targets=r'attn\.(q|v|o)|mlp\.(gate|down)')
  spec = ModelSpec(c.model)
  shardings = {n: jax.sharding.SingleDeviceSharding(jax.devices()[0]) for n in spec.names}
  base = hf.load_params(str(tmp_path / 'base'), ModelSpec(lora.without_adapters(c.model)), shardings)
  params = with_random_b({**spec.init(jax.random.key(0)), **base})
  ours = np.asarray(forward(spec, params, TOKENS))

  # lm -> PEFT: the real peft package loads our adapter onto the HF base.
  lm_peft.save_peft(str(tmp_path / 'adapter'), params, c.model)
  peft_model = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / 'adapter')).eval()
  assert np.max(np.abs(hf_logits(peft_model) - ours)) <= 1e-4

  # PEFT -> lm: an adapter PEFT itself trained and saved loads into lm with the same logits.
  hf_base = make_hf_model('llama2', tmp_path / 'base2')
  peft_cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=['k_proj', 'up_proj'],
                             lora_dropout=0.0, init_lora_weights=False)
  trained = peft.get_peft_model(hf_base, peft_cfg).eval()  # init_lora_weights=False: B random
  trained.save_pretrained(str(tmp_path / 'peft_adapter'))
  expected = hf_logits(trained)
  config = lm_peft.lora_config_from_peft(lm_peft.read_peft_config(str(tmp_path / 'peft_adapter')))
  c.model.lora.update(config)
  spec = ModelSpec(c.model)
  adapter = lm_peft.load_peft(str(tmp_path / 'peft_adapter'), spec)
  assert set(adapter) == {'layers.attn.k.lora_a', 'layers.attn.k.lora_b', 'layers.mlp.up.lora_a',
                          'layers.mlp.up.lora_b'}
  got = np.asarray(forward(spec, {**base, **adapter}, TOKENS))
  assert np.max(np.abs(got - expected)) <= 1e-4
  del torch
