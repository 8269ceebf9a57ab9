"""The chunked loss (lm/train/losses.py) equals the whole-logits path in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_batch, tiny_config

from lm.train import losses, objectives
from lm.train.loop import Trainer
from lm.train.state import ModelSpec

TOL = 1e-5


def assert_trees_close(a, b, tol=TOL):
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    y = dict(jax.tree_util.tree_leaves_with_path(b))[path]
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=tol, rtol=tol, err_msg=str(path))


@pytest.mark.parametrize('chunk', [1, 4, 7, 64])  # 7 does not divide T = 10: the tail is padded
def test_chunked_scores_equal_whole_logits(chunk):
  B, T, D, V = 2, 10, 8, 50
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, T, D))
  w = 0.5 * jax.random.normal(k[1], (V, D))
  targets = jax.random.randint(k[2], (B, T), 0, V)
  weights = jax.random.uniform(k[3], (B, T)) * (jnp.arange(T) < 8)  # weighted, with masked labels
  project = lambda w, x: jnp.einsum('btd,vd->btv', x, w)

  def loss(scores_fn):
    def f(w, x):  # weighted cross-entropy plus a z-loss, so both lse and logp carry gradient
      s = scores_fn(w, x)
      return -jnp.sum(s.logp * weights) + 1e-2 * jnp.sum(jnp.square(s.lse) * weights), s
    return jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))

  (plain, plain_s), plain_g = loss(lambda w, x: losses.scores_from_logits(project(w, x), targets))(w, x)
  (chunked, chunked_s), chunked_g = loss(
      lambda w, x: losses.chunked_token_logprobs(project, w, x, targets, chunk))(w, x)
  np.testing.assert_allclose(chunked, plain, rtol=TOL)
  assert_trees_close(chunked_s._asdict(), plain_s._asdict())
  assert_trees_close(chunked_g, plain_g)


def _grads(cfg, objective, batch, *, reference=False, seed=0):
  spec = ModelSpec(cfg.model, reference=reference)
  params = spec.init(jax.random.key(seed))
  # LoRA's B starts at zero; perturb every parameter so adapters contribute to the logits.
  keys = iter(jax.random.split(jax.random.key(seed + 1), len(params)))
  params = {n: p + 0.05 * jax.random.normal(next(keys), p.shape) for n, p in params.items()}

  def loss(params):
    loss_sum, weight_sum, aux = objective(spec.bind(params), batch)
    return loss_sum / weight_sum, aux

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize('model', [dict(tie_embeddings=True), dict(tie_embeddings=False),
                                   dict(lora=dict(rank=4, targets='attn|lm_head')),
                                   dict(tie_embeddings=False, final_logit_softcap=0.5)],
                         ids=['tied', 'untied', 'lora-lm_head', 'gemma-softcap'])
def test_next_token_loss_and_gradients_match_plain_path(model):
  batch = random_batch(tiny_config(), docs_per_row=2)
  batch['weights'][:, :5] = 0.0  # masked labels (a prompt)
  batch['weights'][0] *= 2.5  # and loss weights
  results = []
  for chunk in (0, 5):
    c = tiny_config(**model, loss_chunk_size=chunk)
    results.append(_grads(c, objectives.next_token_xent, batch))
  (plain_loss, plain_aux), plain_g = results[0]
  (loss, aux), g = results[1]
  np.testing.assert_allclose(loss, plain_loss, rtol=TOL)
  np.testing.assert_allclose(aux['accuracy'], plain_aux['accuracy'])
  assert_trees_close(g, plain_g)


def _preference_batch(B=4, T=16, V=128, seed=0):
  rng = np.random.default_rng(seed)
  batch = {}
  for side in ('chosen', 'rejected'):
    tokens = rng.integers(0, V, (B, T + 1), dtype=np.int32)
    seg = np.where(np.arange(T) < 8, 1, 2).astype(np.int32)
    weights = np.tile(np.isin(np.arange(T), [4, 5, 6, 7, 12, 13, 14]), (B, 1)).astype(np.float32)
    batch.update({f'{side}_tokens': tokens[:, :-1], f'{side}_targets': tokens[:, 1:],
                  f'{side}_weights': weights, f'{side}_segment_ids': np.tile(seg, (B, 1)),
                  f'{side}_positions': np.tile(np.where(seg == 1, np.arange(T), np.arange(T) - 8),
                                               (B, 1)).astype(np.int32)})
  return batch


@pytest.mark.parametrize('lora', [0, 4], ids=['full-reference', 'lora-reference'])
def test_dpo_matches_plain_path(lora):
  batch = _preference_batch()
  results = []
  for chunk in (0, 3):
    c = tiny_config(loss_chunk_size=chunk, lora=dict(rank=lora))
    results.append(_grads(c, objectives.dpo, batch, reference=not lora))
  (plain_loss, plain_aux), plain_g = results[0]
  (loss, aux), g = results[1]
  np.testing.assert_allclose(loss, plain_loss, rtol=TOL)
  assert_trees_close(aux, plain_aux, tol=1e-4)  # sums of log-probabilities, tens in size
  assert_trees_close(g, plain_g)


def test_grpo_with_adapters_off_reference_matches_plain_path():
  """GRPO's policy and reference (adapters off) log-probs both take the chunked path."""
  batch = random_batch(tiny_config(), docs_per_row=1)
  batch['weights'][:, :4] = 0.0  # the prompt
  B, T = batch['tokens'].shape
  batch['old_logps'] = np.full((B, T), -4.0, np.float32)
  batch['advantages'] = np.linspace(-1.0, 1.0, B).astype(np.float32)
  results = []
  for chunk in (0, 3):
    c = tiny_config(loss_chunk_size=chunk, lora=dict(rank=4))
    results.append(_grads(c, objectives.grpo, batch))
  (plain_loss, plain_aux), plain_g = results[0]
  (loss, aux), g = results[1]
  np.testing.assert_allclose(loss, plain_loss, rtol=TOL)
  assert float(plain_aux['kl']) > 0  # the reference differs from the policy: the KL term counts
  assert_trees_close(aux, plain_aux, tol=1e-4)
  assert_trees_close(g, plain_g)


def test_chunked_cross_entropy_is_the_token_loss():
  c = tiny_config(loss_chunk_size=4)
  spec = ModelSpec(c.model)
  model = spec.bind(spec.init(jax.random.key(0)))
  batch = random_batch(c)
  xent = objectives.chunked_cross_entropy(model, batch)
  logits = model(batch['tokens'], batch['positions'], batch['segment_ids'])
  expected = -losses.scores_from_logits(logits, batch['targets']).logp
  assert xent.shape == batch['targets'].shape
  np.testing.assert_allclose(xent, expected, rtol=TOL, atol=TOL)


def test_sharded_step_with_vocab_sharded_head_matches_plain_path():
  """A train step on 8 devices (FSDP x vocabulary over tensor) gives the same update."""
  after = []
  for chunk in (0, 8):
    c = tiny_config(loss_chunk_size=chunk)
    c.mesh.shape.update(data=1, fsdp=2, tensor=4)
    c.optimizer.update(name='sgd', b1=0.0, grad_clip=0.0, weight_decay=0.0)
    trainer = Trainer(c)
    assert tuple(trainer.shardings.params['lm_head.kernel'].spec) == ('fsdp', 'tensor')
    state = trainer.init_state()
    state, metrics = trainer.step(state, trainer.global_batch(random_batch(c)))
    after.append((jax.device_get(state.params), float(metrics['loss'])))
  np.testing.assert_allclose(after[1][1], after[0][1], rtol=TOL)
  assert_trees_close(after[1][0], after[0][0])


def test_chunked_step_holds_no_whole_logits():
  """The compiled step's temporaries shrink by about the [B, T, V] float32 logits and gradient."""
  temps = {}
  for chunk in (0, 8):
    c = tiny_config(vocab_size=8192, loss_chunk_size=chunk)
    c.data.update(seq_len=64, batch_size=8)
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.init_state()
    batch = trainer.global_batch(random_batch(c))
    temps[chunk] = trainer.step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
  logits = 8 * 64 * 8192 * 4
  assert temps[8] < temps[0] - logits, temps


def test_a_sequence_within_one_chunk_takes_the_plain_path():
  """With T <= loss_chunk_size chunking saves nothing, so the step must not pay the chunked
  backward's recomputed logits: its FLOPs equal the whole-logits step's."""
  flops = {}
  for chunk in (0, 16):  # tiny_config's seq_len is 16
    c = tiny_config(vocab_size=4096, loss_chunk_size=chunk)
    trainer = Trainer(c, devices=jax.devices()[:1])
    state = trainer.init_state()
    batch = trainer.global_batch(random_batch(c))
    flops[chunk] = trainer.step.lower(state, batch).compile().cost_analysis()['flops']
  assert flops[16] == flops[0], flops
