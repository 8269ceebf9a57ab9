"""The GRPO loop with an environment of its own: prompts and rewards from a Python class, the
held-out reward, an environment that fails mid-run skipping the round or stopping the run
(grpo.on_error), as configured, and multi-turn episodes sampled by the rollout engine whose
recorded log-probs are the trainer's at every model token."""

import json
import os

import jax
import numpy as np
import pytest
from conftest import tiny_config
from data_util import needs_shared
from test_objectives_grpo import grpo_config, metrics_by_step

from lm.errors import ConfigError
from lm.eval import environments
from lm.train import grpo_loop
from lm.train.loop import Trainer


class Doubling(environments.Environment):
  """Prompts 'i + i?'; reward 1 for a completion naming 2i. The record marked `bad` makes the
  reward raise: every round that draws it fails."""

  def records(self):
    return [{'question': f'{i} + {i}?', 'answer': str(2 * i), 'bad': i == 3} for i in range(12)]

  def prompt(self, record):
    return record['question']

  def reward(self, record, text):
    if record['bad']:
      raise ValueError('record 3 is bad')
    return {'exact': float(record['answer'] in text), 'short': 0.1 * (len(text) < 10)}


def env_config(tmp_path, steps, on_error):
  c = grpo_config(tmp_path, steps)  # the shapes of test_objectives_grpo's run: its programs
  c.grpo.update(environment=f'{__name__}.Doubling', prompts=None, on_error=on_error,
                updates_per_batch=1, eval_size=2, eval_every=2)
  c.train.update(steps=steps, checkpoint_every=100)
  return c


@needs_shared
def test_a_failing_environment_skips_the_round_or_stops_the_run_as_configured(tmp_path, capsys):
  rounds = [grpo_loop.round_prompts(10, 4, 3, r) for r in range(8)]  # 10 records after 2 held out
  bad = [r for r, chosen in enumerate(rounds) if 3 in chosen]
  assert bad and bad[0] < 3, rounds  # the seed draws record 3 early, and not in every round

  run = str(tmp_path / 'skip')
  summary = grpo_loop.train(env_config(tmp_path, 3, 'skip'), run, progress=False)
  out = capsys.readouterr().out
  skipped = [l for l in out.splitlines() if 'skipped:' in l]
  assert len(skipped) == len([r for r in bad if r < 3 + len(skipped)])
  assert skipped[0].startswith(f'lm: grpo: round {bad[0] + 1} skipped: grpo environment '
                               f'{__name__}.Doubling: reward raised ValueError: record 3 is bad on sample ')
  metrics = metrics_by_step(run)
  assert summary['step'] == 3 and {1, 2, 3} <= set(metrics)  # every step trained, none lost
  assert {'reward/exact', 'reward/short'} <= set(metrics[1])
  assert 0 <= metrics[2]['heldout_reward'] <= 1.1 and 'heldout_reward' in metrics[0]

  run = str(tmp_path / 'stop')
  with pytest.raises(environments.EnvironmentFailure) as e:
    grpo_loop.train(env_config(tmp_path, 3, 'stop'), run, progress=False)
  assert str(e.value).startswith(f'grpo environment {__name__}.Doubling: reward raised ValueError')
  assert '\n' not in str(e.value)
  ckpts = os.listdir(os.path.join(run, 'checkpoints')) if bad[0] else []
  assert [int(s) for s in ckpts if s.isdigit()] == ([bad[0]] if bad[0] else [])  # the rounds done


@needs_shared
def test_overlapped_rounds_sample_and_score_in_the_thread_and_skip_as_without_overlap(tmp_path, capsys):
  """grpo.overlap with an environment: the thread samples and scores whole rounds; a round whose
  reward raised there is skipped when its turn comes, the same rounds as without overlap (those
  that draw record 3), and every step trains."""
  rounds = [grpo_loop.round_prompts(10, 4, 3, r) for r in range(8)]
  expected, trained, r = [], 0, 0  # the rounds drawn until 3 train, and those that draw record 3
  while trained < 3:
    if 3 in rounds[r]:
      expected.append(r)
    else:
      trained += 1
    r += 1
  c = env_config(tmp_path, 3, 'skip')
  c.grpo.overlap = True
  summary = grpo_loop.train(c, str(tmp_path / 'overlap'), progress=False)
  skipped = [l for l in capsys.readouterr().out.splitlines() if 'skipped:' in l]
  assert expected and [l.split(' skipped:')[0] for l in skipped] == [
      f'lm: grpo: round {r + 1}' for r in expected]
  metrics = metrics_by_step(str(tmp_path / 'overlap'))
  assert summary['step'] == 3 and {1, 2, 3} <= set(metrics)
  assert 'overlap_s' in metrics[1] and {'reward/exact', 'reward/short'} <= set(metrics[1])

def test_environment_settings_fail_before_any_work(tmp_path):
  c = grpo_config(tmp_path, 2)
  c.grpo.on_error = 'ignore'
  with pytest.raises(ConfigError, match="grpo.on_error='ignore'; choose stop"):
    grpo_loop.check_config(c)
  c = grpo_config(tmp_path, 2)
  c.grpo.teacher_coef = 1.0
  with pytest.raises(ConfigError, match='needs a teacher: set --config.distill.teacher'):
    grpo_loop.check_config(c)
  with pytest.raises(ConfigError, match='holds out all 3 prompt records'):
    grpo_loop.split_heldout([{}, {}, {}], 3)
  assert grpo_loop.split_heldout([{'a': 1}, {'a': 2}, {'a': 3}], 1) == ([{'a': 1}, {'a': 2}], [{'a': 3}])
  assert json.dumps(grpo_loop.split_heldout([{}], 0)) == '[[{}], []]'


class LetterTokenizer:
  """pad 0, eos 1, then one id per letter a..z and ' <>/' (vocab 32): decoding is per character,
  so tool calls are found and cut wherever the model writes one."""
  pad_id, eos_id, add_bos = 0, 1, False
  chars = 'abcdefghijklmnopqrstuvwxyz <>/!?'[:30]

  def encode(self, text, bos=False):
    del bos
    return [2 + self.chars.index(c) for c in text]

  def decode(self, ids):
    return ''.join(self.chars[i - 2] for i in ids if i >= 2)


class Letters(environments.Environment):
  """Any of 8 letters ends a model turn in a tool call (a random model writes one most turns);
  the tool answers 'xyz'."""
  tool_stop, max_turns = tuple('abcdefgh'), 3

  def tool(self, record, text):
    return 'xyz'

  def reward(self, record, text):
    return 0.0


def test_multi_turn_episodes_record_the_trainers_log_probs_at_the_model_tokens():
  """Episodes of up to 3 model turns with tool outputs between them, every turn sampled by the
  rollout engine at temperature 1: the log-probs recorded for each row's trained tokens (the
  model's turns, cut at their calls, and the end that stops the last) equal the trainer's forward
  (token_log_probs) on the row built from the episode; tool tokens are in the row at weight 0."""
  c = tiny_config(vocab_size=32, n_layers=1)
  c.data.update(seq_len=40, batch_size=8)
  c.train.update(objective='grpo')
  c.grpo.update(group_size=2, max_new_tokens=6, temperature=1.0, stop=(), kl_coef=0.0)
  trainer = Trainer(c, devices=jax.devices()[:1])
  tok, env = LetterTokenizer(), Letters()
  sampler = grpo_loop.Sampler(trainer, tok)
  params = trainer.init_state().params
  records = [{} for _ in range(8)]
  prompts = [tok.encode(w) for w in ('qrs', 'qrs', 'tuv', 'tuv', 'wz', 'wz', 'mnop', 'mnop')]
  ep = grpo_loop.run_episodes(sampler, env, 'letters', params, prompts, records, list(range(8)),
                              jax.random.key(0), timeout_s=5)
  assert sum(ep.calls) >= 4 and max(ep.calls) == 2, ep.calls  # turns 1 and 2 were sampled
  rows = grpo_loop.episode_rows(ep.prompts, ep.segments, tok.pad_id, c.data.seq_len)
  w = rows['weights'] > 0
  for b in range(8):
    assert len(ep.logps[b]) == w[b].sum()  # one recorded log-prob per trained token
    tool = [t for t, wt, seg in zip(rows['targets'][b], rows['weights'][b], rows['segment_ids'][b])
            if seg and wt == 0]
    assert tok.decode(tool).count('xyz') == ep.calls[b]  # every tool output, untrained
  old = grpo_loop.sampling_log_probs(rows['weights'], ep.logps)
  forward = np.asarray(sampler.log_probs(params, trainer.global_batch(rows)))
  np.testing.assert_allclose(old[w], forward[w], atol=2e-5)
