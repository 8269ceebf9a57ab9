"""The DPO family (IPO, SimPO, ORPO, KTO): loss and gradient against a plain reference on fixed
inputs, the KTO data format, and held-out reward accuracy and margin from a real Trainer."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from data_util import LLAMA2, data_config, needs_shared

from lm.data import formats, pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.errors import ConfigError, DataError
from lm.train import objectives
from lm.train.loop import Trainer

B, T, V = 2, 8, 6
# Row layout shared by chosen and rejected rows: two pairs per row, segment 1 and segment 2, the
# reply weights on the last tokens of each segment (rejected replies one token shorter).
SEG = np.array([[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2, 2, 2]], np.int32)
CHOSEN_W = np.array([[0, 1, 1, 1, 0, 1, 1, 0], [0, 1, 1, 0, 1, 1, 1, 1]], np.float32)
REJECTED_W = np.array([[0, 0, 1, 1, 0, 0, 1, 0], [0, 0, 1, 0, 0, 1, 1, 1]], np.float32)
PAIRS = [(i, s) for i in range(B) for s in (1, 2)]


class LogitsModel:
  """A 'model' whose logits are a parameter: the objectives see only model(tokens, ...)."""

  def __init__(self, logits, reference=None):
    self.logits, self.reference = logits, reference
    self.cfg = type('Cfg', (), {'lora': type('Lora', (), {'rank': 0})})()

  def __call__(self, tokens, positions, segment_ids):
    del positions, segment_ids
    return self.logits


def fixed_inputs(seed=0):
  rng = np.random.default_rng(seed)
  batch = {}
  for side, w in (('chosen', CHOSEN_W), ('rejected', REJECTED_W)):
    batch[f'{side}_tokens'] = rng.integers(0, V, (B, T)).astype(np.int32)
    batch[f'{side}_targets'] = rng.integers(0, V, (B, T)).astype(np.int32)
    batch[f'{side}_weights'] = w
    batch[f'{side}_segment_ids'] = SEG
    batch[f'{side}_positions'] = np.zeros((B, T), np.int32)
  logits = {side: rng.normal(size=(B, T, V)).astype(np.float32) for side in ('chosen', 'rejected')}
  ref = {side: rng.normal(size=(B, T, V)).astype(np.float32) for side in ('chosen', 'rejected')}
  return batch, logits, ref


# -- a plain reference: log-softmax, explicit per-pair loops --------------------------------------


def pair_logps(logits, batch, side):
  """[(sum log p, tokens) for each pair in PAIRS] with explicit masks."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  out = []
  for i, s in PAIRS:
    total, n = 0.0, 0.0
    for t in range(T):
      if batch[f'{side}_segment_ids'][i, t] == s and batch[f'{side}_weights'][i, t] > 0:
        total = total + logp[i, t, batch[f'{side}_targets'][i, t]]
        n += 1.0
    out.append((total, n))
  return out


def reference_loss(name, pol, ref, batch, **kw):
  c, r = pair_logps(pol['chosen'], batch, 'chosen'), pair_logps(pol['rejected'], batch, 'rejected')
  if ref is not None:
    rc, rr = pair_logps(ref['chosen'], batch, 'chosen'), pair_logps(ref['rejected'], batch, 'rejected')
  losses = []
  for k in range(len(PAIRS)):
    (lc, nc), (lr, nr) = c[k], r[k]
    if name == 'ipo':
      h = (lc - rc[k][0]) / nc - (lr - rr[k][0]) / nr
      losses.append((h - 1 / (2 * kw['beta'])) ** 2)
    elif name == 'simpo':
      m = kw['beta'] * lc / nc - kw['beta'] * lr / nr - kw['gamma']
      losses.append(jnp.log1p(jnp.exp(-m)))
    elif name == 'orpo':
      pc, pr = jnp.exp(lc / nc), jnp.exp(lr / nr)
      log_odds_ratio = jnp.log(pc / (1 - pc)) - jnp.log(pr / (1 - pr))
      losses.append(-lc / nc + kw['weight'] * jnp.log1p(jnp.exp(-log_odds_ratio)))
  return sum(losses)


class SideModel:
  """Logits chosen by which rows it is given (the chosen and rejected tokens differ)."""

  def __init__(self, table, batch, reference=None):
    self.table, self.batch, self.reference = table, batch, reference
    self.cfg = type('Cfg', (), {'lora': type('Lora', (), {'rank': 0})})()

  def __call__(self, tokens, positions, segment_ids):
    del positions, segment_ids
    same = np.array_equal(np.asarray(tokens), self.batch['chosen_tokens'])
    return self.table['chosen' if same else 'rejected']


def objective_loss(fn, pol, ref, batch):
  model = SideModel(pol, batch, SideModel(ref, batch) if ref is not None else None)
  loss, n, metrics = fn(model, batch)
  return loss, (n, metrics)


CASES = [('ipo', objectives.ipo, dict(beta=0.3), True),
         ('simpo', objectives.simpo, dict(beta=2.0, gamma=0.5), False),
         ('orpo', objectives.orpo, dict(weight=0.2), False)]


@pytest.mark.parametrize('name,fn,kw,uses_ref', CASES, ids=[c[0] for c in CASES])
def test_pair_objectives_match_the_reference_loss_and_gradient(name, fn, kw, uses_ref):
  batch, pol, ref = fixed_inputs()
  ref = ref if uses_ref else None
  (loss, (n, metrics)), grads = jax.value_and_grad(
      lambda p: objective_loss(functools.partial(fn, **kw), p, ref, batch), has_aux=True)(pol)
  want, want_grads = jax.value_and_grad(lambda p: reference_loss(name, p, ref, batch, **kw))(pol)
  assert float(n) == len(PAIRS)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for side in ('chosen', 'rejected'):
    np.testing.assert_allclose(grads[side], want_grads[side], rtol=1e-4, atol=1e-6)
    assert np.abs(grads[side]).max() > 1e-4
  assert 0 <= float(metrics['reward_accuracy']) <= len(PAIRS)


# -- KTO ----------------------------------------------------------------------------------------

KTO_SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 2]], np.int32)
KTO_W = np.array([[0, 1, 1, 0, -1, -1, -1, 0], [0, 0, -1, -1, -1, 0, 1, 1]], np.float32)
KTO_EXAMPLES = [(0, 1, 1), (0, 2, -1), (1, 1, -1), (1, 2, 1)]  # row, segment, label


def test_kto_matches_the_reference_loss_and_gradient():
  rng = np.random.default_rng(1)
  batch = {'tokens': rng.integers(0, V, (B, T)).astype(np.int32),
           'targets': rng.integers(0, V, (B, T)).astype(np.int32), 'weights': KTO_W,
           'segment_ids': KTO_SEG, 'positions': np.zeros((B, T), np.int32)}
  pol = rng.normal(size=(B, T, V)).astype(np.float32)
  ref = rng.normal(size=(B, T, V)).astype(np.float32)
  beta, wd, wu = 0.5, 1.0, 1.5

  def reference(p):
    lp, lr = jax.nn.log_softmax(p, -1), jax.nn.log_softmax(ref, -1)
    rewards = []
    for i, s, _ in KTO_EXAMPLES:
      r = 0.0
      for t in range(T):
        if KTO_SEG[i, t] == s and KTO_W[i, t] != 0:
          r = r + lp[i, t, batch['targets'][i, t]] - lr[i, t, batch['targets'][i, t]]
      rewards.append(r)
    z = jax.lax.stop_gradient(jnp.maximum(sum(rewards) / len(rewards), 0.0))
    return sum(wd * (1 - jax.nn.sigmoid(beta * (r - z))) if label > 0 else
               wu * (1 - jax.nn.sigmoid(beta * (z - r)))
               for r, (_, _, label) in zip(rewards, KTO_EXAMPLES))

  def ours(p):
    loss, n, metrics = objectives.kto(LogitsModel(p, LogitsModel(ref)), batch, beta=beta,
                                      desirable_weight=wd, undesirable_weight=wu)
    return loss, (n, metrics)

  (loss, (n, metrics)), grads = jax.value_and_grad(ours, has_aux=True)(pol)
  want, want_grads = jax.value_and_grad(reference)(pol)
  assert float(n) == 4 and float(metrics['desirable']) == 2
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(grads, want_grads, rtol=1e-4, atol=1e-6)
  assert np.abs(grads).max() > 1e-4


def kto_records(n):
  return [{'prompt': f'What is {i} plus {i}?', 'completion': str(2 * i if i % 2 else i + 1),
           'label': bool(i % 2)} for i in range(n)]


@needs_shared
def test_kto_data_carries_the_label_as_the_sign_of_the_weights(tmp_path):
  enc = formats.Encoder('kto', tokenizer_lib.load(LLAMA2), seq_len=64, chat_template='plain')
  for label, sign in ((True, 1.0), (False, -1.0)):
    (ids, weights), = enc({'prompt': 'What is 2+2?', 'completion': 'four', 'label': label})[0]
    assert len(ids) == len(weights) and set(np.unique(weights)) == {0.0, sign}
  with pytest.raises(DataError, match='label'):
    enc.parse({'prompt': 'What is 2+2?', 'completion': 'four'})
  assert enc.check({'prompt': 'x', 'completion': 'y'})[1]  # fatal under bad_records=fail
  pair = {'prompt': 'What is 2+2?', 'chosen': 'four', 'rejected': 'five'}
  signs = [set(np.unique(w)) - {0.0} for _, w in enc(pair)[0]]
  assert signs == [{1.0}, {-1.0}]  # a pair reads as a desirable and an undesirable example

  path = tmp_path / 'kto.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in kto_records(40)))
  c = data_config(train_files=str(path), format='kto', tokenizer=LLAMA2, seq_len=64,
                  chat_template='plain')
  corpus = pipeline.build_corpus(c.data, tokenizer_lib.load(LLAMA2))
  rows = corpus.eval
  for i in range(len(rows['weights'])):
    for s in set(rows['segment_ids'][i]) - {0}:
      w = rows['weights'][i][rows['segment_ids'][i] == s]
      assert len(set(np.sign(w[w != 0]))) == 1  # one label per example
  assert (rows['weights'] > 0).any() or (rows['weights'] < 0).any()


def test_objective_and_data_format_must_agree():
  c = tiny_config()
  c.train.objective = 'kto'
  with pytest.raises(ConfigError, match='data.format=kto'):
    objectives.check_data(c)
  c.train.objective, c.data.format = 'simpo', 'kto'
  with pytest.raises(ConfigError, match='data.format=preference'):
    objectives.check_data(c)
  c.data.format = 'preference'
  objectives.check_data(c)


def test_held_out_evaluation_reports_reward_accuracy_and_margin():
  batch, _, _ = fixed_inputs()
  rows = {k: np.concatenate([v] * 2) for k, v in batch.items()}
  c = tiny_config(vocab_size=V * 4)
  c.data.update(seq_len=T, batch_size=4)
  c.train.objective = 'simpo'
  trainer = Trainer(c, devices=jax.devices()[:1])
  metrics = trainer.evaluate(trainer.init_state().params, rows, max_batches=1)
  assert {'eval_loss', 'eval_reward_accuracy', 'eval_reward_margin'} <= set(metrics)
  assert 0.0 <= metrics['eval_reward_accuracy'] <= 1.0 and metrics['eval_reward_margin'] != 0.0


def test_orpo_log_one_minus_p_keeps_its_digits_for_near_certain_replies():
  """log(1 - exp(x)) in float32: the naive log1p(-exp(x)) loses most digits as x -> 0 (a reply the
  model is almost sure of); log1mexp matches the float64 value to float32 precision everywhere."""
  x = np.array([-3e-6, -1e-5, -1e-4, -1e-3, -0.5, -0.7, -2.0, -5.0], np.float32)
  exact = np.log(-np.expm1(x.astype(np.float64)))
  stable = np.asarray(objectives.log1mexp(jnp.asarray(x)), np.float64)
  naive = np.asarray(jnp.log1p(-jnp.exp(jnp.asarray(x))), np.float64)
  np.testing.assert_allclose(stable, exact, rtol=1e-6)
  assert np.max(np.abs(naive - exact)[:3]) > 1e-3  # what the naive form lost
  assert np.all(np.isfinite(jax.grad(lambda v: objectives.log1mexp(v).sum())(jnp.asarray(x))))
