"""The GRPO loop with an environment of its own: prompts and rewards from a Python class, the
held-out reward, and an environment that fails mid-run skipping the round or stopping the run
(grpo.on_error), as configured."""

import json
import os

import pytest
from data_util import needs_shared
from test_objectives_grpo import grpo_config, metrics_by_step

from lm.errors import ConfigError
from lm.eval import environments
from lm.train import grpo_loop


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
