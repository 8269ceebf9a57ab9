"""GRPO: the clipped objective (three aggregations, asymmetric clipping, KL) against a plain
reference, the advantages, the rows, the rewards, and a tiny run that resumes exactly."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, tiny_config
from data_util import LLAMA2, make_hf_tokenizer, needs_shared

from lm.errors import ConfigError, UserError
from lm.eval import rewards
from lm.train import grpo_loop, objectives

B, T, V = 4, 6, 5
W = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0], [0, 0, 1, 1, 0, 0]],
             np.float32)


class LogitsModel:
  def __init__(self, logits, reference=None):
    self.logits, self.reference = logits, reference
    self.cfg = type('Cfg', (), {'lora': type('Lora', (), {'rank': 0})})()

  def __call__(self, tokens, positions, segment_ids):
    del tokens, positions, segment_ids
    return self.logits


def fixed():
  rng = np.random.default_rng(0)
  targets = rng.integers(0, V, (B, T)).astype(np.int32)
  batch = {'tokens': targets, 'positions': targets, 'segment_ids': targets, 'targets': targets,
           'weights': W, 'advantages': np.array([1.0, -0.5, 2.0, -1.5], np.float32)}
  policy = rng.normal(size=(B, T, V)).astype(np.float32)
  ref = rng.normal(size=(B, T, V)).astype(np.float32)
  logp = jax.nn.log_softmax(policy, -1)
  taken = np.take_along_axis(np.asarray(logp), targets[..., None], -1)[..., 0]
  # Old log-probs off by up to +-0.5 so some ratios leave the clip range on both sides.
  batch['old_logps'] = (taken + rng.uniform(-0.5, 0.5, (B, T))).astype(np.float32)
  return batch, policy, ref


def reference(policy, ref, batch, *, lo, hi, beta, loss_type):
  """Token by token, completion by completion, as the papers write it."""
  lp, lr = jax.nn.log_softmax(policy, -1), jax.nn.log_softmax(ref, -1)
  per_row, all_tokens, n_tokens = [], 0.0, 0
  for b in range(B):
    terms = []
    for t in range(T):
      if W[b, t] == 0:
        continue
      y = batch['targets'][b, t]
      ratio = jnp.exp(lp[b, t, y] - batch['old_logps'][b, t])
      a = batch['advantages'][b]
      surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - lo, 1 + hi) * a)
      d = jax.lax.stop_gradient(lr[b, t, y]) - lp[b, t, y]
      terms.append(-surrogate + beta * (jnp.exp(d) - d - 1))
    per_row.append(sum(terms))
    all_tokens = all_tokens + sum(terms)
    n_tokens += len(terms)
  if loss_type == 'grpo':
    return sum(r / float(W[b].sum()) for b, r in enumerate(per_row)) / B
  if loss_type == 'dapo':
    return all_tokens / n_tokens
  return all_tokens / (B * 8)  # dr_grpo: / (completions x max_new_tokens)


@pytest.mark.parametrize('loss_type,lo,hi,beta', [('grpo', 0.2, 0.2, 0.04), ('dapo', 0.2, 0.28, 0.0),
                                                  ('dr_grpo', 0.1, 0.3, 0.1)])
def test_grpo_matches_the_reference_loss_and_gradient(loss_type, lo, hi, beta):
  batch, policy, ref = fixed()

  def ours(p):
    loss, n, aux = objectives.grpo(LogitsModel(p, LogitsModel(ref)), batch, clip_low=lo,
                                   clip_high=hi, kl_coef=beta, loss_type=loss_type,
                                   max_completion=8)
    return loss / n, aux  # what the step computes: the sum over its weight

  (loss, aux), grad = jax.value_and_grad(ours, has_aux=True)(policy)
  want, want_grad = jax.value_and_grad(
      lambda p: reference(p, ref, batch, lo=lo, hi=hi, beta=beta, loss_type=loss_type))(policy)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
  assert np.abs(grad).max() > 1e-4


def test_clip_fraction_and_kl_are_token_means():
  batch, policy, ref = fixed()
  loss, n, aux = objectives.grpo(LogitsModel(policy, LogitsModel(ref)), batch, clip_low=0.2,
                                 clip_high=0.2, kl_coef=0.0, loss_type='grpo')
  logp = np.asarray(jax.nn.log_softmax(policy, -1))
  taken = np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  ratio = np.exp(taken - batch['old_logps'])
  a = batch['advantages'][:, None]
  clipped = (ratio * a) > (np.clip(ratio, 0.8, 1.2) * a)
  want = (clipped * W).sum() / W.sum()
  assert 0 < want < 1
  assert float(aux['clip_fraction'] / n) == pytest.approx(want, rel=1e-5)
  assert float(aux['kl']) == 0.0  # kl_coef 0: no reference pass, no KL


def test_group_advantages_and_rows():
  r = np.array([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
  adv = grpo_loop.group_advantages(r, 4, scale=True)
  np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], rtol=1e-3)
  np.testing.assert_array_equal(adv[4:], 0.0)  # a group without signal gives no gradient
  np.testing.assert_allclose(grpo_loop.group_advantages(r, 4, scale=False)[:4], [.5, -.5, -.5, .5])
  rows = grpo_loop.completion_rows([[1, 5, 6], [1, 7]], [[8, 9], [10]], [2, None], pad_id=0,
                                   seq_len=6)
  np.testing.assert_array_equal(rows['tokens'][0], [1, 5, 6, 8, 9, 0])
  np.testing.assert_array_equal(rows['targets'][0], [5, 6, 8, 9, 2, 0])
  np.testing.assert_array_equal(rows['weights'][0], [0, 0, 1, 1, 1, 0])  # completion + its eos
  np.testing.assert_array_equal(rows['weights'][1], [0, 1, 0, 0, 0, 0])  # cut by length: no eos
  assert grpo_loop.round_prompts(10, 4, 0, 3) == grpo_loop.round_prompts(10, 4, 0, 3)
  assert sorted(grpo_loop.round_prompts(10, 5, 0, 0) + grpo_loop.round_prompts(10, 5, 0, 1)) == list(range(10))


def test_prompts_render_as_a_user_turn_of_the_chat_template(tmp_path):
  from lm.data import tokenizer as tokenizer_lib
  tokenizer = tokenizer_lib.load(make_hf_tokenizer(tmp_path / 'tok', 'qwen'))
  c = tiny_config()
  c.grpo.prompt_format = '{question} Answer with #### N.'
  record = {'question': 'What is 2 + 3?', 'answer': '#### 5'}
  encode, end_ids = grpo_loop.prompt_encoder(c, tokenizer)  # default '': plain text
  assert end_ids == () and tokenizer.decode(encode(record)) == 'What is 2 + 3? Answer with #### N.'
  c.grpo.chat_template = 'tokenizer'  # the tokenizer's own (ChatML) template
  encode, end_ids = grpo_loop.prompt_encoder(c, tokenizer)
  assert tokenizer.decode(encode(record)) == (
      '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n'
      'What is 2 + 3? Answer with #### N.<|im_end|>\n<|im_start|>assistant\n')
  assert tokenizer.token_to_id('<|im_end|>') in end_ids  # sampling stops at the end of the turn
  c.grpo.chat_template = 'no_such_template'
  with pytest.raises(ConfigError, match="grpo.chat_template='no_such_template'"):
    grpo_loop.prompt_encoder(c, tokenizer)


def test_rewards():
  record = {'answer': 'She has 3 + 4 = 7 apples.\n#### 7'}
  assert rewards.gsm8k_exact('3 + 4 = 7\n#### 7', record) == 1.0
  assert rewards.gsm8k_exact('so 7 apples', record) == 1.0  # last number when no ####
  assert rewards.gsm8k_exact('#### 8', record) == 0.0
  assert rewards.answer_format('#### 12', record) == 1.0 and rewards.answer_format('12', record) == 0.0
  assert rewards.brevity('', record) == 1.0 and rewards.brevity('x' * 800, record) == 0.0
  assert [n for n, _ in rewards.resolve('lm.eval.rewards.gsm8k_exact, lm.eval.rewards.brevity')] == [
      'lm.eval.rewards.gsm8k_exact', 'lm.eval.rewards.brevity']
  for bad in ('lm.eval.rewards.nope', 'no_such_module.fn', 'gsm8k_exact'):
    with pytest.raises(ConfigError, match='does not name a function'):
      rewards.resolve(bad)


@pytest.mark.parametrize('reward, needle', [
    (lambda c, r: float('nan'), 'grpo reward my.nan returned nan on sample 1 (prompt record 7, '
                                "completion 'second'); a reward must return a finite number"),
    (lambda c, r: '1', "grpo reward my.nan returned str '1' on sample 0"),
    (lambda c, r: None, 'returned NoneType None on sample 0'),
    (lambda c, r: r['missing'], "grpo reward my.nan raised KeyError: 'missing' on sample 0 (prompt "
                                "record 3, completion 'first'); fix the reward function"),
])
def test_every_reward_value_is_checked_and_names_the_function_and_sample(reward, needle):
  ok = lambda c, r: 1.0 if c == 'first' else reward(c, r)  # the first sample passes where it can
  fns = [('lm.eval.rewards.brevity', rewards.brevity), ('my.nan', ok if 'sample 1' in needle else reward)]
  with pytest.raises(UserError) as e:
    rewards.score(fns, ['first', 'second'], [{'answer': '1'}, {'answer': '2'}], [3, 7])
  assert needle in str(e.value) and '\n' not in str(e.value), str(e.value)
  good = rewards.score([('b', rewards.brevity), ('t', lambda c, r: True)], ['', 'x' * 200],
                       [{}, {}], [0, 1])
  np.testing.assert_array_equal(good, [[1.0, 1.0], [0.5, 1.0]])


def test_advantages_divide_by_the_population_std_not_the_sample_std():
  """TRL divides by torch's sample std (n-1); lm by the population std (n), as docs/posttraining.md
  says. For a group of G the two differ by sqrt(G / (G - 1)), folded into the learning rate."""
  r = np.array([1.0, 0.0, 0.0, 0.0])
  adv = grpo_loop.group_advantages(r, 4, scale=True)
  np.testing.assert_allclose(adv, (r - r.mean()) / (r.std(ddof=0) + 1e-4), rtol=1e-6)
  assert not np.allclose(adv, (r - r.mean()) / (r.std(ddof=1) + 1e-4), rtol=1e-3)


def test_an_unresolvable_reward_is_one_line_and_exit_2(tmp_path):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run(
      [sys.executable, '-m', 'lm', 'train', '--config', 'configs/grpo.py',
       '--workdir', str(tmp_path / 'run'), '--config.train.init_from=',
       '--config.grpo.rewards=lm.eval.rewards.exact_answer'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith('lm: ')]
  assert len(lines) == 1 and "'lm.eval.rewards.exact_answer' does not name a function" in lines[0]
  assert not (tmp_path / 'run').exists()


def grpo_config(tmp_path, steps):
  prompts = tmp_path / 'prompts.jsonl'
  prompts.write_text(''.join(json.dumps({'question': f'{i} + {i}?', 'answer': f'#### {2 * i}'}) + '\n'
                             for i in range(12)))
  c = tiny_config(vocab_size=32000, n_layers=1)
  c.data.update(tokenizer=LLAMA2, seq_len=24, batch_size=8)
  c.mesh.shape.update(data=-1)  # the test session's 8 CPU devices
  c.model.lora.update(rank=4, alpha=8.0)
  c.train.update(objective='grpo', trainable='lora', steps=steps, checkpoint_every=2, seed=3)
  c.optimizer.update(lr=1e-2)
  c.metrics.update(tensorboard=False)
  c.grpo.update(prompts=str(prompts), group_size=2, updates_per_batch=2, max_new_tokens=6,
                rewards='lm.eval.rewards.brevity,lm.eval.rewards.answer_format', stop=())
  return c


def metrics_by_step(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    return {m['step']: m for m in map(json.loads, f)}


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """Metrics by step of an uninterrupted 2-round run (4 steps), sampling without overlap."""
  tmp = tmp_path_factory.mktemp('grpo')
  grpo_loop.train(grpo_config(tmp, 4), str(tmp / 'straight'), progress=False)
  return metrics_by_step(str(tmp / 'straight'))


@needs_shared
def test_a_grpo_run_resumes_with_the_same_samples(tmp_path, straight_run):
  split = str(tmp_path / 'split')
  grpo_loop.train(grpo_config(tmp_path, 2), split, progress=False)
  grpo_loop.train(grpo_config(tmp_path, 4), split, progress=False)  # resumes at step 2 (round 1)
  a, b = straight_run, metrics_by_step(split)
  assert sorted(a) == [2, 4]
  for step in (4,):
    for key in ('reward_mean', 'completion_length', 'loss', 'kl'):
      assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-7), (step, key)
  assert all(k in a[4] for k in ('reward_std', 'clip_fraction', 'sample_s', 'train_s', 'wait_s',
                                 'overlap_s', 'round_s', 'reward/brevity', 'reward/answer_format'))


@needs_shared
def test_overlapped_sampling_is_one_round_off_policy_and_resumes_exactly(tmp_path, straight_run,
                                                                         monkeypatch):
  """grpo.overlap: round 0 is sampled before training, as without overlap (same step-2
  metrics); round 1 is sampled from the weights before round 0's update, so its step-4 loss
  differs from the on-policy run's. Preempted after round 0, the checkpoint carries round 1's
  samples and the resumed run ends exactly as the uninterrupted overlapped one."""
  from lm.errors import Preempted
  from lm.train import preemption
  c = grpo_config(tmp_path, 4)
  c.grpo.overlap = True
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  grpo_loop.train(c, straight, progress=False)
  with monkeypatch.context() as m:
    m.setattr(preemption.StopSignal, 'should_stop', lambda self: True)
    with pytest.raises(Preempted):
      grpo_loop.train(c, split, progress=False)
  grpo_loop.train(c, split, progress=False)
  a, b = metrics_by_step(straight), metrics_by_step(split)
  for key in ('reward_mean', 'completion_length', 'loss', 'kl'):
    assert a[2][key] == pytest.approx(straight_run[2][key], rel=1e-5, abs=1e-7), key
    assert b[4][key] == pytest.approx(a[4][key], rel=1e-5, abs=1e-7), key
  assert a[4]['loss'] != pytest.approx(straight_run[4]['loss'], rel=1e-4)


@needs_shared
def test_sampling_on_its_own_devices_is_the_run_that_shares_them(tmp_path, straight_run,
                                                                 monkeypatch):
  """grpo.sampler_devices=4 of the session's 8: the trainer's mesh holds the first four, each
  round's weights are copied to the last four, where the engine samples, and the run's samples,
  rewards and losses are those of the run whose sampler shares the trainer's devices."""
  placed = set()
  place = grpo_loop.Sampler.place

  def recording_place(self, params):
    out = place(self, params)
    placed.update(d for v in out.values() for d in v.devices())
    return out
  monkeypatch.setattr(grpo_loop.Sampler, 'place', recording_place)
  c = grpo_config(tmp_path, 4)
  c.grpo.sampler_devices = 4
  grpo_loop.train(c, str(tmp_path / 'apart'), progress=False)
  assert placed == set(jax.devices()[4:])
  apart = metrics_by_step(str(tmp_path / 'apart'))
  for step in (2, 4):
    for key in ('reward_mean', 'completion_length', 'loss', 'kl'):
      assert apart[step][key] == pytest.approx(straight_run[step][key], rel=1e-5, abs=1e-7), (step, key)


@pytest.mark.parametrize('n, batch, message', [
    (8, 8, 'grpo.sampler_devices=8 leaves none of the 8 devices to train on; set at most 7'),
    (3, 8, 'grpo.sampler_devices=3 must divide data.batch_size=8')])
def test_a_sampler_device_split_that_cannot_work_is_one_line(tmp_path, n, batch, message):
  c = grpo_config(tmp_path, 2)
  c.grpo.sampler_devices, c.data.batch_size = n, batch
  with pytest.raises(ConfigError, match=message):
    grpo_loop.split_devices(c, jax.devices())
  c.grpo.sampler_devices = 0
  assert grpo_loop.split_devices(c, jax.devices()) == (list(jax.devices()), None)


@needs_shared
def test_log_probs_are_taken_at_temperature_one_whatever_the_sampling_temperature(tmp_path):
  """docs/posttraining.md: old_logps, the policy's and the reference's log-probs are all the
  untempered model's (TRL divides the logits by the sampling temperature; at 1 the two agree)."""
  from lm.data import tokenizer as tokenizer_lib
  from lm.train.loop import Trainer
  c = grpo_config(tmp_path, 2)
  c.grpo.temperature = 0.5
  trainer = Trainer(c, devices=jax.devices()[:1])
  tok = tokenizer_lib.load(LLAMA2)
  sampler = grpo_loop.Sampler(trainer, tok)
  state = trainer.init_state()
  prompts = [tok.encode('1 + 1?', bos=True)] * c.data.batch_size
  cut, completions, ends, _ = sampler(state.params, prompts, jax.random.key(0))
  rows = grpo_loop.completion_rows(cut, completions, ends, tok.pad_id, c.data.seq_len)
  batch = trainer.global_batch(rows)
  old = np.asarray(sampler.log_probs(state.params, batch))
  logits = np.asarray(jax.jit(lambda p, b: trainer.spec.bind(p)(b['tokens'], b['positions'],
                                                                 b['segment_ids']))(state.params, batch))
  at = lambda t: np.take_along_axis(np.asarray(jax.nn.log_softmax(logits / t, -1)),
                                    rows['targets'][..., None], -1)[..., 0]
  w = rows['weights'] > 0
  assert w.any()
  np.testing.assert_allclose(old[w], at(1.0)[w], atol=2e-4)
  assert np.abs(old[w] - at(0.5)[w]).max() > 1e-2
