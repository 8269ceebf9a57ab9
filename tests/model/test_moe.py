"""Mixture-of-Experts: routing semantics, grouped == dense reference, router losses in the
objective, expert parallelism == one device, and partitions / LoRA that really train experts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config, train_steps

from lm import config as config_lib
from lm.errors import ConfigError
from lm.model import lora, moe
from lm.train import objectives, partition
from lm.train.loop import Trainer
from lm.train.state import ModelSpec


def moe_config(**moe_fields):
  c = tiny_config()
  c.model.moe.update(n_experts=4, experts_per_token=2, expert_dim=16, **moe_fields)
  return c


def numpy_moe(x_ND, router_DE, gate_EDF, up_EDF, down_EFD, k, norm_topk_prob):
  """Token by token, as HF's Mixtral / Qwen3-MoE blocks compute it."""
  out = np.zeros_like(x_ND)
  for n, x in enumerate(x_ND):
    logits = x @ router_DE
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:k]
    weights = probs[top] / (probs[top].sum() if norm_topk_prob else 1.0)
    for e, w in zip(top, weights):
      g = x @ gate_EDF[e]
      out[n] += w * ((g / (1 + np.exp(-g))) * (x @ up_EDF[e])) @ down_EFD[e]
  return out


@pytest.mark.parametrize('implementation', ['ragged', 'dense'])
@pytest.mark.parametrize('norm_topk_prob', [True, False])
def test_layer_matches_the_families_routing(implementation, norm_topk_prob):
  c = moe_config(implementation=implementation, norm_topk_prob=norm_topk_prob)
  from flax import nnx
  layer = moe.MoE(c.model, rngs=nnx.Rngs(0))
  x = np.random.default_rng(0).standard_normal((2, 8, 32)).astype(np.float32)
  y, stats = layer(jnp.asarray(x))
  w = lambda p: np.asarray(p[...])
  expected = numpy_moe(x.reshape(16, 32), w(layer.router), w(layer.gate.kernel), w(layer.up.kernel),
                       w(layer.down.kernel), 2, norm_topk_prob)
  np.testing.assert_allclose(np.asarray(y).reshape(16, 32), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.sum(stats['expert_fraction']), 2.0, rtol=1e-6)  # k per token
  np.testing.assert_allclose(np.sum(stats['router_prob']), 1.0, rtol=1e-6)


def test_grouped_matmul_equals_dense_reference_in_logits_and_gradients():
  batch = random_batch(moe_config())
  results = []
  for implementation in ('ragged', 'dense'):
    c = moe_config(implementation=implementation)
    spec = ModelSpec(c.model)
    params = spec.init(jax.random.key(0))
    objective = objectives.from_config(c)
    loss = lambda p: objective(spec.bind(p), batch)[0]
    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (l1, g1), (l2, g2) = results
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  for name in g1:
    # atol: float32 summation order, on gradients of order 1 (the embeddings reach 4)
    np.testing.assert_allclose(g1[name], g2[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_router_losses_enter_the_objective_with_their_weights_and_are_logged():
  c = moe_config(aux_loss_weight=0.5, z_loss_weight=0.25)
  spec = ModelSpec(c.model)
  params = spec.init(jax.random.key(0))
  batch = random_batch(c)
  with_router = jax.jit(lambda p: objectives.from_config(c)(spec.bind(p), batch))(params)
  plain = jax.jit(lambda p: objectives.next_token_xent(spec.bind(p), batch))(params)
  loss_sum, weight_sum, metrics = with_router
  lb, z = metrics['moe_load_balancing'] / weight_sum, metrics['moe_router_z'] / weight_sum
  assert 1.9 < lb < 4.0 and z > 0  # balanced routing gives k = 2; never below
  np.testing.assert_allclose(loss_sum, plain[0] + (0.5 * lb + 0.25 * z) * weight_sum, rtol=1e-5)
  # Held-out loss is the model's fit alone; a dense model gets no router terms at all.
  assert objectives.for_evaluation(objectives.from_config(c)) is objectives.next_token_xent
  assert objectives.from_config(tiny_config()) is objectives.next_token_xent


def test_load_balancing_loss_pushes_routing_towards_balance():
  c = moe_config(aux_loss_weight=1.0, z_loss_weight=0.0)
  c.model.moe.experts_per_token = 1
  spec = ModelSpec(c.model)
  params = spec.init(jax.random.key(0))
  params['layers.moe.router'] = params['layers.moe.router'].at[..., 0].add(1.0)  # favour expert 0
  batch = random_batch(c)
  objective = objectives.from_config(c)
  lb = jax.jit(lambda p: objective(spec.bind(p), batch)[2]['moe_load_balancing'])
  grad = jax.jit(jax.grad(lb))(params)['layers.moe.router']
  # A small step against the gradient (the metric is a sum over the batch's tokens: unnormalised,
  # its gradient overshoots at any fixed learning rate).
  step = 0.05 * grad / jnp.max(jnp.abs(grad))
  stepped = {**params, 'layers.moe.router': params['layers.moe.router'] - step}
  assert float(lb(stepped)) < float(lb(params))


def _two_steps(c, devices=None):
  """(params after two steps, [(loss, grad_norm)] per step, the last step's metrics, the compiled
  step's HLO text)."""
  trainer = Trainer(c, devices=devices)
  state = trainer.init_state()
  batches = [trainer.global_batch(random_batch(c, seed=i)) for i in range(2)]
  compiled = trainer.step.lower(state, batches[0]).compile()
  losses = []
  for batch in batches:
    state, m = compiled(state, batch)
    losses.append((float(m['loss']), float(m['grad_norm'])))
  return state.params, losses, m, compiled.as_text()


@pytest.fixture(scope='module')
def single_device_run():
  params, losses, metrics, _ = _two_steps(moe_config(), jax.devices()[:1])
  return jax.device_get(params), losses, set(metrics)


def _collectives(hlo: str) -> dict:
  """Count of each collective op in compiled HLO text."""
  ops = ('all-to-all', 'all-gather', 'all-reduce', 'reduce-scatter', 'collective-permute')
  return {op: len(re.findall(rf' {op}(-start)?\(', hlo)) for op in ops}


@pytest.mark.parametrize('shape', [dict(data=2, fsdp=1, tensor=1, expert=4),
                                   dict(data=1, fsdp=2, tensor=2, expert=2)])
def test_expert_parallel_step_equals_single_device(shape, single_device_run):
  """Tokens reach the devices holding their experts by all-to-all (two forward, two backward per
  MoE layer) and the step equals the single-device one."""
  expected_params, expected, metrics = single_device_run
  assert {'moe_load_balancing', 'moe_router_z'} <= metrics  # the router losses are logged
  c = moe_config()
  c.mesh.shape.update(shape)
  params, losses, _, hlo = _two_steps(c)
  np.testing.assert_allclose(losses, expected, rtol=2e-5)  # loss and gradient norm
  gate = params['layers.moe.gate.kernel']
  assert gate.addressable_shards[0].data.shape[1] == 4 // shape['expert']  # experts split
  for name, value in jax.device_get(params).items():  # Adam at lr 1e-2 after two steps
    np.testing.assert_allclose(value, expected_params[name], rtol=1e-4, atol=2e-5, err_msg=name)
  assert _collectives(hlo)['all-to-all'] >= 4, _collectives(hlo)


def test_expert_capacity_drops_and_counts_copies_past_it(single_device_run):
  """With a capacity factor each device sends each expert device at most that many times its
  even share of copies (the dropless path sends all: the test above); past it, copies are
  dropped and their share logged."""
  _, expected, _ = single_device_run
  c = moe_config(capacity_factor=0.5)
  c.mesh.shape.update(data=2, expert=4)
  _, losses, metrics, _ = _two_steps(c)
  assert 0 < float(metrics['moe_dropped']) < 1
  assert not np.allclose(losses, expected, rtol=1e-3)


def _changed_slices(before, after):
  """Per (layer, expert) slice: did it change?"""
  diff = np.abs(np.asarray(after) - np.asarray(before))
  return np.max(diff.reshape(*diff.shape[:2], -1), axis=-1) > 0


def test_lora_on_experts_trains_every_expert_adapter_and_nothing_else():
  c = moe_config()
  c.model.lora.update(rank=2, alpha=4.0)  # default targets: attention and every expert's gate/up/down
  c.train.trainable = 'lora'
  c.optimizer.weight_decay = 0.0  # a change must come from the gradient
  trainer = Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  before = jax.device_get(state.params)
  assert before['layers.moe.gate.lora_a'].shape == (2, 4, 32, 2)  # [L, E, D, r]: one A per expert
  batch = trainer.global_batch(random_batch(c))
  for _ in range(2):  # B starts at 0, so A's gradient is 0 until B has moved once
    state, _ = trainer.step(state, batch)
  after = jax.device_get(state.params)
  for name in before:
    if partition.is_adapter(name) and name.startswith('layers.moe.'):
      assert _changed_slices(before[name], after[name]).all(), name  # every layer, every expert
    else:
      changed = not np.array_equal(before[name], after[name])
      assert changed == partition.is_adapter(name), name

  # Merged into the expert kernels, the adapters give the same function.
  spec = trainer.spec
  merged = lora.merge(after, c.model.lora)
  base_spec = ModelSpec(lora.without_adapters(c.model))
  tokens = random_batch(c)['tokens']
  np.testing.assert_allclose(jax.jit(lambda p: base_spec.bind(p)(tokens))(merged),
                             jax.jit(lambda p: spec.bind(p)(tokens))(after), rtol=1e-4, atol=1e-5)


def test_expert_partition_trains_every_expert_and_freezes_the_router_and_attention():
  c = moe_config()
  c.train.trainable = r'regex:^layers\.moe\.(gate|up|down)\.'
  trainer, _, before, after = train_steps(c)
  for name in before:
    if trainer.labels[name] == partition.TRAINABLE:
      assert _changed_slices(before[name], after[name]).all(), name
    else:
      np.testing.assert_array_equal(before[name], after[name], err_msg=name)


def test_bad_moe_settings_are_one_line_errors():
  for fields, match in ((dict(n_experts=4, experts_per_token=5), 'experts_per_token'),
                        (dict(n_experts=4, implementation='megablocks'), 'ragged or dense'),
                        (dict(n_experts=4, aux_loss_weight=-1.0), 'must not be negative'),
                        (dict(n_experts=4, router='gemma4'), 'scaled_softmax'),
                        # Gemma 4's block: a dense branch to norm, and the layer's output norm.
                        (dict(n_experts=4, branch_norms=True), r'^model\.moe\.branch_norms=True '
                         r'needs the dense branch: set model\.moe\.shared_dim > 0'),
                        (dict(n_experts=4, branch_norms=True, shared_dim=8),
                         r"needs model\.norm_placement='sandwich'.*not 'pre'$")):
    c = tiny_config()
    c.model.moe.update(fields)
    with pytest.raises(ConfigError, match=match):
      config_lib.validate(c)


def test_flops_count_the_routed_experts_not_all_of_them():
  from lm.train import flops
  moe_model, dense = moe_config().model, tiny_config(mlp_dim=2 * 16).model  # k * expert_dim
  router = moe_model.n_layers * moe_model.d_model * 4
  assert flops.matmul_params(moe_model) == flops.matmul_params(dense) + router
  # A shared expert (and its gate) runs on every token: every kernel of its MLP counts.
  L, D = moe_model.n_layers, moe_model.d_model
  shared = moe_config(shared_dim=24, shared_gate=True).model
  assert flops.matmul_params(shared) == flops.matmul_params(moe_model) + L * (3 * D * 24 + D)
