"""GRPO environments (lm/eval/environments.py): math-verify and reasoning-gym rewards, the
calculator tool, multi-turn episodes whose tool outputs stay in the context with loss weight 0,
and every failure of an environment as one line naming it and the sample."""

import time

import jax
import numpy as np
import pytest

from lm.errors import ConfigError
from lm.eval import environments
from lm.eval.environments import EnvironmentFailure
from lm.train import grpo_loop


def test_math_answer_compares_by_value_through_math_verify():
  pytest.importorskip('math_verify')
  env = environments.resolve('lm.eval.environments.MathAnswer')[1]
  gsm8k = {'answer': 'She pays 3 * 24 = 72 dollars.\n#### 72'}
  assert env.reward(gsm8k, 'so 3 * 24 = 72.\n#### 72') == 1.0
  assert env.reward(gsm8k, '#### 71') == 0.0
  half = {'answer': '0.5'}
  assert env.reward(half, 'The answer is <answer>$\\frac{1}{2}$</answer>') == 1.0  # by value
  assert env.reward(half, '<answer>1/3</answer>') == 0.0
  assert env.reward(half, 'no answer at all') == 0.0


def test_reasoning_gym_tasks_are_reproducible_and_scored_by_the_task():
  pytest.importorskip('reasoning_gym')
  spec = 'lm.eval.environments.ReasoningGym:chain_sum,min_terms=2,max_terms=2,max_digits=1,size=20,seed=3'
  name, env = environments.resolve(spec)
  assert name == 'lm.eval.environments.ReasoningGym'
  records = env.records()
  assert len(records) == 20 and records == environments.resolve(spec)[1].records()
  r = records[0]
  assert env.prompt(r).startswith(r['question']) and '<answer>' in env.prompt(r)
  assert env.reward(r, f'<answer>{r["answer"]}</answer>') == 1.0
  assert env.reward(r, f'The sum is {r["answer"]}.') == 1.0  # untagged: the last number
  assert env.reward(r, f'<answer>{int(r["answer"]) + 1}</answer>') == 0.0
  with pytest.raises(ConfigError, match="reasoning-gym task 'no_such_task'"):
    environments.resolve('lm.eval.environments.ReasoningGym:no_such_task')


def test_the_calculator_evaluates_arithmetic_and_never_runs_code():
  assert environments.arithmetic('(3 + 4) * 2') == 14
  assert environments.arithmetic('1,200 / 4') == 300
  for bad in ('__import__("os").system("true")', '2 ** 100000', 'x'):
    with pytest.raises((ValueError, SyntaxError)):
      environments.arithmetic(bad)
  calc = environments.Calculator('2')
  assert calc.max_turns == 3 and calc.tool_stop == ('</calc>',)
  assert calc.tool({}, 'so <calc>48 / 2</calc>') == '<result>24</result>'
  assert calc.tool({}, '<calc>1 / 3</calc>') == '<result>0.333333</result>'
  assert calc.tool({}, '<calc>open("f")</calc>') == '<result>error</result>'


class CharTokenizer:
  """One token per character: ids are code points."""
  eos_id = 0

  def encode(self, text):
    return [ord(c) for c in text]

  def decode(self, ids):
    return ''.join(chr(i) for i in ids)


class ScriptedSampler:
  """Samples what a script says: turn t, j-th context given -> (text, ended by eos); records the
  contexts. The log-prob it records for the i-th id of a turn t sample is 100 t + i."""
  prompt_len = 60

  def __init__(self, script):
    self.script, self.tokenizer, self.contexts = script, CharTokenizer(), []

  def sample(self, params, contexts, rng):
    del params, rng
    turn = len(self.contexts)
    self.contexts.append([list(c) for c in contexts])
    out = [self.script[turn].get(b, ('', False)) for b in range(len(contexts))]
    tok = self.tokenizer
    return grpo_loop.Rollouts([list(c) for c in contexts], [tok.encode(t) for t, _ in out],
                              [tok.eos_id if eos else None for _, eos in out], [t for t, _ in out],
                              [100.0 * turn + np.arange(len(t) + eos) for t, eos in out])


def test_a_tool_call_continues_the_episode_with_the_output_in_context_but_not_in_the_loss():
  script = [{0: ('a<calc>2+3</calc>made-up result', False), 1: ('#### 6', True)},
            {0: ('#### 5', True)}]
  sampler, env = ScriptedSampler(script), environments.Calculator('1')
  tok = sampler.tokenizer
  prompts = [tok.encode('Q1?'), tok.encode('Q2?')]
  records = [{'answer': '#### 5'}, {'answer': '#### 5'}]
  cut, segments, texts, calls, logps = grpo_loop.run_episodes(
      sampler, env, 'calc', None, prompts, records, [7, 8], rng=jax.random.key(0), timeout_s=5)
  # The turn is cut where the call ends (what the model wrote after it is dropped); the tool's
  # output joins the context of the next turn, which samples only the episode still going.
  assert tok.decode(sampler.contexts[1][0]) == 'Q1?a<calc>2+3</calc><result>5</result>'
  assert len(sampler.contexts[1]) == 1
  assert texts == ['a<calc>2+3</calc><result>5</result>#### 5', '#### 6'] and calls == [1, 0]
  rows = grpo_loop.episode_rows(cut, segments, pad_id=0, seq_len=48)
  row = tok.decode(rows['targets'][0][rows['targets'][0] > 0])
  assert row == '1?a<calc>2+3</calc><result>5</result>#### 5' + ''  # eos is id 0: not shown
  w = rows['weights'][0]
  trained = ''.join(chr(t) for t, wt in zip(rows['targets'][0], w) if wt > 0 and t > 0)
  assert trained == 'a<calc>2+3</calc>#### 5'  # the model's tokens only
  assert w.sum() == len('a<calc>2+3</calc>#### 5') + 1  # + the eos that ended it
  # Each model turn keeps its own recorded log-probs, at its trained tokens, in order: turn 0's
  # up to the end of the call (what came after is cut with it), then turn 1's and its eos.
  old = grpo_loop.sampling_log_probs(rows['weights'], logps)
  np.testing.assert_array_equal(old[0][w > 0], list(range(17)) + [100.0 + i for i in range(7)])
  assert (old[0][w == 0] == 0).all()
  np.testing.assert_array_equal(logps[1], range(7))  # '#### 6' and its eos, turn 0
  reward, parts = environments.score('calc', env, texts, records, [7, 8], 5)
  np.testing.assert_array_equal(reward, [1.0, 0.0])
  assert list(parts) == ['reward']


class Broken(environments.Environment):
  """A tool and a reward that go wrong as `how` says."""
  tool_stop, max_turns = ('</t>',), 2

  def __init__(self, how):
    self.how = how

  def tool(self, record, text):
    if self.how == 'tool raises':
      raise RuntimeError('tool is down')
    if self.how == 'tool hangs':
      time.sleep(1)
    return 42 if self.how == 'tool returns int' else 'ok'

  def reward(self, record, text):
    return {'reward raises': lambda: 1 / 0, 'reward nan': lambda: float('nan'),
            'reward str': lambda: 'yes', 'reward parts': lambda: {'exact': 1.0, 'style': None},
            }.get(self.how, lambda: 1.0)()


@pytest.mark.parametrize('how, needle', [
    ('tool raises', "grpo environment my.Broken: tool raised RuntimeError: tool is down on sample 1 "
                    "(prompt record 8, completion 'call</t>'); fix the environment"),
    ('tool hangs', 'grpo environment my.Broken: tool timed out after 0.2 s on sample 1 (prompt '
                   'record 8'),
    ('tool returns int', 'grpo environment my.Broken: tool returned int 42 on sample 1'),
    ('reward raises', 'grpo environment my.Broken: reward raised ZeroDivisionError: division by zero '
                      "on sample 0 (prompt record 7, completion 'done')"),
    ('reward nan', 'reward returned nan for \'reward\' on sample 0'),
    ('reward str', "reward returned str 'yes' for 'reward' on sample 0"),
    ('reward parts', "reward returned NoneType None for 'style' on sample 0"),
])
def test_an_environment_that_fails_is_one_line_naming_it_and_the_sample(how, needle):
  sampler, env = ScriptedSampler([{0: ('done', True), 1: ('call</t>', False)}, {0: ('x', True)}]), Broken(how)
  prompts, records = [[65], [66]], [{}, {}]
  with pytest.raises(EnvironmentFailure) as e:
    texts = grpo_loop.run_episodes(sampler, env, 'my.Broken', None, prompts, records,
                                    [7, 8], rng=jax.random.key(0), timeout_s=0.2).texts
    environments.score('my.Broken', env, texts, records, [7, 8], 0.2)
  assert needle in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_environment_names_that_do_not_resolve_are_config_errors():
  for spec, needle in [('no_such_module.Env', "cannot import 'no_such_module'"),
                       ('lm.eval.environments.Nope', 'does not name a class'),
                       ('lm.eval.environments.arithmetic:1', 'not a lm.eval.environments.Environment')]:
    with pytest.raises((ConfigError, ValueError), match=needle):
      environments.resolve(spec)
  name, env = environments.resolve('', rewards='lm.eval.rewards.brevity')
  assert name == 'rewards' and isinstance(env, environments.RewardFunctions)
