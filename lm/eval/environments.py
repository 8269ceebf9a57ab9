"""Environments for GRPO (lm/train/grpo_loop.py): where prompts come from, what a tool returns,
and how an episode is scored.

An environment is a Python class (configs are code, and so are environments: `grpo.environment`
names one by dotted path, and naming it imports and runs that module). Subclass `Environment`
and override what you need:

  records()            the prompt records (list of dicts); None: read `grpo.prompts`
  prompt(record)       the prompt text of a record; None: `grpo.prompt_format` filled from it
  tool(record, text)   after a model turn that ends in one of `tool_stop`: the tool's output,
                       appended to the context before sampling continues (`text` is the episode so
                       far, ending in the call); None ends the episode
  reward(record, text) the episode's reward: a number, or a dict of named parts that add up to it

`tool_stop` and `max_turns` (model turns per episode) are class attributes. Tool outputs stay in
the context the model sees but carry loss weight 0: the policy is trained on its own tokens only.

`grpo.environment` is `module.Class` or `module.Class:ARG`, ARG passed to the constructor as one
string (as `configs/X.py:arg` is to get_config). Shipped here: `MathAnswer` (math-verify),
`ReasoningGym` (reasoning-gym's procedural tasks), `Calculator` (GSM8K with a calculator tool);
empty `grpo.environment` scores with the reward functions of `grpo.rewards` (lm/eval/rewards.py).

Every call into an environment is checked (lm.eval.environments.call): one that raises, runs past
`grpo.env_timeout_s` or returns something malformed is an EnvironmentFailure, one line naming the
environment, the call and the sample; the loop then skips the round or stops the run
(`grpo.on_error`), never scoring the sample 0 in silence.
"""

from __future__ import annotations

import ast
import importlib
import math
import numbers
import operator
import re
import threading

import numpy as np

from lm.errors import ConfigError, UserError
from lm.eval import rewards as rewards_lib
from lm.eval.text_metrics import extract_answer


class EnvironmentFailure(UserError):
  """An environment or tool raised, timed out or returned something malformed on a sample."""


class Environment:
  """The base environment: single-turn, prompts from `grpo.prompts`; override `reward`."""
  tool_stop: tuple[str, ...] = ()  # strings that end a model turn in a tool call
  max_turns: int = 1  # model turns per episode; tool calls beyond max_turns - 1 are not run

  def records(self) -> list[dict] | None:
    return None

  def prompt(self, record: dict) -> str | None:
    del record
    return None

  def tool(self, record: dict, text: str) -> str | None:
    del record, text
    return None

  def reward(self, record: dict, text: str):
    raise NotImplementedError(f'{type(self).__name__} must define reward(record, text)')


def describe(index: int, record_id, text: str) -> str:
  """How a one-line error names a sample."""
  return (f'sample {index} (prompt record {record_id}, completion {text[:40]!r}'
          f'{"..." if len(text) > 40 else ""})')


def call(name: str, what: str, fn, args: tuple, sample: str, timeout_s: float):
  """fn(*args), run in a daemon thread so that a call past `timeout_s` seconds (0: no limit) is
  abandoned with an EnvironmentFailure: Python cannot kill a thread, so a hung tool keeps its
  thread until it returns, but neither the run nor its exit waits for it. An exception from fn
  is an EnvironmentFailure naming it and the sample."""
  result = {}

  def run():
    try:
      result['value'] = fn(*args)
    except Exception as e:  # pylint: disable=broad-except  # the user's code, the user's error
      result['error'] = e

  worker = threading.Thread(target=run, name=f'lm-environment-{what}', daemon=True)
  worker.start()
  worker.join(timeout_s if timeout_s > 0 else None)
  if worker.is_alive():
    raise EnvironmentFailure(f'grpo environment {name}: {what} timed out after {timeout_s:g} s '
                             f'on {sample}; fix it or raise grpo.env_timeout_s')
  if 'error' in result:
    e = result['error']
    raise EnvironmentFailure(f'grpo environment {name}: {what} raised {type(e).__name__}: '
                             f'{(str(e).splitlines() or [""])[0][:120]} on {sample}; fix the '
                             'environment')
  return result['value']


def checked_reward(name: str, value, sample: str) -> dict[str, float]:
  """A reward as {part: value}: a number (one part, `reward`) or a dict of named numbers, each
  finite; anything else is an EnvironmentFailure."""
  parts = value if isinstance(value, dict) else {'reward': value}
  if not parts:
    raise EnvironmentFailure(f'grpo environment {name}: reward returned an empty dict on {sample}; '
                             'return a number or a dict of named numbers')
  out = {}
  for part, v in parts.items():
    if isinstance(v, (str, bytes)) or not isinstance(v, numbers.Real):
      raise EnvironmentFailure(f'grpo environment {name}: reward returned {type(v).__name__} '
                               f'{v!r:.40} for {part!r} on {sample}; a reward must be a number')
    if not math.isfinite(float(v)):
      raise EnvironmentFailure(f'grpo environment {name}: reward returned {float(v)} for {part!r} '
                               f'on {sample}; a reward must be a finite number')
    out[str(part)] = float(v)
  return out


class RewardFunctions(Environment):
  """Today's GRPO scoring: the functions `grpo.rewards` names, weighted by `grpo.reward_weights`;
  each logged unweighted as its own part (`reward/<function>`)."""

  def __init__(self, names: str, weights=()):
    self.functions = rewards_lib.resolve(names)
    if weights and len(weights) != len(self.functions):
      raise ConfigError(f'grpo.reward_weights has {len(weights)} entries for '
                        f'{len(self.functions)} rewards; give one weight per reward or ()')
    self.weights = list(weights) or [1.0] * len(self.functions)

  def score(self, texts, records, record_ids):
    """(reward [B], {part: [B]}) with rewards_lib.score's checks (a bad value is a UserError)."""
    try:
      scores = rewards_lib.score(self.functions, texts, records, record_ids)
    except EnvironmentFailure:
      raise
    except UserError as e:
      raise EnvironmentFailure(str(e)) from None
    parts = {n.rsplit('.', 1)[-1]: scores[:, j] for j, (n, _) in enumerate(self.functions)}
    return scores @ np.asarray(self.weights, np.float64), parts


_NUMBER = re.compile(r'-?\d+(?:\.\d+)?')


def _answer_text(text: str, *, numeric: bool = False) -> str:
  """The answer a completion gives: inside its last <answer>...</answer>, else after `####`,
  else (`numeric`: the expected answer is a number) its last number, else the whole text."""
  found = re.findall(r'<answer>(.*?)</answer>', text, flags=re.S)
  if found:
    return found[-1].strip()
  if '####' in text:
    return text.rsplit('####', 1)[1].strip()
  numbers = _NUMBER.findall(text) if numeric else []
  return numbers[-1] if numbers else text.strip()


def _optional(module: str, environment: str):
  """An optional dependency of an environment (the `rl` extra), or a ConfigError saying so."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ConfigError(f'grpo.environment {environment} needs {module}: pip install \'lm[rl]\' '
                      '(math-verify and reasoning-gym)') from None


class MathAnswer(Environment):
  """1 if math-verify finds the completion's answer equal to the record's (GSM8K's `#### N` is
  read as N; LaTeX, fractions and expressions compare by value), else 0. ARG: the record field
  holding the answer (default `answer`)."""

  def __init__(self, field: str = ''):
    self.math_verify, self.field = _optional('math_verify', 'MathAnswer'), field or 'answer'

  def reward(self, record, text):
    gold = str(record[self.field])
    gold = gold.rsplit('####', 1)[1].strip() if '####' in gold else gold
    mv = self.math_verify
    # Timeouts off: math-verify's use SIGALRM, which works only in the main thread; lm's
    # grpo.env_timeout_s bounds the call instead.
    parsed = mv.parse(_answer_text(text), parsing_timeout=None)
    return float(bool(parsed) and mv.verify(mv.parse(gold, parsing_timeout=None), parsed,
                                            timeout_seconds=None))


def _parse_args(arg: str) -> dict:
  """'a=1,b=x' -> {'a': 1, 'b': 'x'}: values as Python literals where they parse, else strings."""
  out = {}
  for item in (s.strip() for s in arg.split(',') if s.strip()):
    key, sep, value = item.partition('=')
    if not sep:
      raise ConfigError(f'grpo.environment argument {item!r} is not KEY=VALUE')
    try:
      out[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = value.strip()
  return out


class ReasoningGym(Environment):
  """A reasoning-gym task (procedurally generated, offline). ARG: `TASK[,key=value...]`, the
  keys going to reasoning_gym.create_dataset (size, seed and the task's own settings, e.g.
  `chain_sum,min_terms=2,max_terms=2,max_digits=1,size=2000`). The prompt asks for the answer in
  <answer> tags; the reward is the task's own score_answer of the tagged answer; without tags,
  of the completion's last number where the task's answer is a number (a small model states its
  answer in a sentence more often than in tags), else of the whole completion."""

  INSTRUCTION = '\nGive only the final answer, inside <answer></answer> tags.'

  def __init__(self, arg: str = ''):
    reasoning_gym = _optional('reasoning_gym', 'ReasoningGym')
    task, _, rest = arg.partition(',')
    if not task:
      raise ConfigError('grpo.environment=lm.eval.environments.ReasoningGym needs a task: '
                        '...ReasoningGym:chain_sum,size=2000 (reasoning_gym.factory names them)')
    kwargs = {'size': 1000, 'seed': 0, **_parse_args(rest)}
    try:
      self.dataset = reasoning_gym.create_dataset(task, **kwargs)
    except Exception as e:  # pylint: disable=broad-except  # an unknown task or setting
      raise ConfigError(f'grpo.environment: reasoning-gym task {task!r} with {kwargs}: '
                        f'{type(e).__name__}: {(str(e).splitlines() or [""])[0][:160]}') from None

  def records(self):
    return [dict(entry, index=i) for i, entry in enumerate(self.dataset)]

  def prompt(self, record):
    return record['question'] + self.INSTRUCTION

  def reward(self, record, text):
    entry = {k: v for k, v in record.items() if k != 'index'}
    numeric = _NUMBER.fullmatch(str(entry['answer']).strip()) is not None
    return float(self.dataset.score_answer(_answer_text(text, numeric=numeric), entry))


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.USub: operator.neg, ast.UAdd: operator.pos,
        ast.Mod: operator.mod, ast.FloorDiv: operator.floordiv}


def arithmetic(expression: str) -> float:
  """The value of + - * / % // and parentheses over numbers; anything else (names, calls, powers)
  is a ValueError: the calculator never runs the model's text as code."""

  def value(node):
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
      return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](value(node.left), value(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
      return _OPS[type(node.op)](value(node.operand))
    raise ValueError(f'not arithmetic: {ast.unparse(node)[:40]}')

  if len(expression) > 200:
    raise ValueError('expression longer than 200 characters')
  return value(ast.parse(expression.replace(',', '').replace('x', '*').strip(), mode='eval').body)


class Calculator(Environment):
  """GSM8K with a calculator tool: the model writes `<calc>EXPRESSION</calc>`, the environment
  appends `<result>VALUE</result>` (or `<result>error</result>` for what is not arithmetic) and
  sampling continues; the reward is 1 for the record's GSM8K answer (after `####`, else the last
  number), else 0. ARG: the most tool calls per episode (default 3)."""

  tool_stop = ('</calc>',)
  PROMPT = ('{question}\nYou may use a calculator: write <calc>expression</calc> and the result '
            'follows. End with the final answer as: #### <number>')

  def __init__(self, arg: str = ''):
    self.max_turns = int(arg or 3) + 1

  def prompt(self, record):
    return self.PROMPT.format(**record)

  def tool(self, record, text):
    del record
    call_ = text.rsplit('<calc>', 1)[-1].split('</calc>', 1)[0]
    try:
      result = arithmetic(call_)
    except (ValueError, SyntaxError, ZeroDivisionError, OverflowError):
      return '<result>error</result>'
    if isinstance(result, float) and result.is_integer():
      result = int(result)
    return f'<result>{result:.6g}</result>' if isinstance(result, float) else f'<result>{result}</result>'

  def reward(self, record, text):
    gold = extract_answer(record['answer'])
    return float(gold != '' and extract_answer(text) == gold)


def score(name: str, env: Environment, texts: list[str], records: list[dict], record_ids: list,
          timeout_s: float):
  """(reward [B], {part: [B]}) of every episode text, each call and value checked (`call`,
  `checked_reward`); a part an episode's reward leaves out counts 0 for it."""
  if isinstance(env, RewardFunctions):
    return env.score(texts, records, record_ids)
  rows = [checked_reward(name, call(name, 'reward', env.reward, (record, text),
                                    describe(b, rid, text), timeout_s), describe(b, rid, text))
          for b, (text, record, rid) in enumerate(zip(texts, records, record_ids))]
  keys = sorted({k for row in rows for k in row})
  parts = {k: np.array([row.get(k, 0.0) for row in rows], np.float64) for k in keys}
  return np.array([sum(row.values()) for row in rows], np.float64), parts


def resolve(spec: str, *, rewards: str = '', weights=()) -> tuple[str, Environment]:
  """(name, environment) for `grpo.environment` (`module.Class[:ARG]`); '' gives the reward
  functions `grpo.rewards` names. A name that does not resolve is a ConfigError naming it."""
  if not spec:
    return 'rewards', RewardFunctions(rewards, weights)
  name, _, arg = spec.partition(':')
  module_name, _, attr = name.rpartition('.')
  try:
    cls = getattr(importlib.import_module(module_name), attr, None) if module_name else None
  except ImportError as e:
    raise ConfigError(f'grpo.environment={spec!r}: cannot import {module_name!r} ({e}); name an '
                      'environment class as module.Class[:ARG], e.g. '
                      'lm.eval.environments.ReasoningGym:chain_sum') from None
  if not callable(cls):
    raise ConfigError(f'grpo.environment={spec!r} does not name a class; give module.Class[:ARG], '
                      'e.g. lm.eval.environments.ReasoningGym:chain_sum')
  env = cls(arg) if arg else cls()
  if not isinstance(env, Environment):
    raise ConfigError(f'grpo.environment={spec!r} made a {type(env).__name__}, not a '
                      'lm.eval.environments.Environment; subclass it')
  if env.max_turns < 1 or (env.max_turns > 1 and not env.tool_stop):
    raise ConfigError(f'grpo.environment={spec!r}: max_turns={env.max_turns} needs at least 1, '
                      'and tool_stop strings when above 1')
  return name, env
