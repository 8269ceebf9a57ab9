"""Task files: every kind on small files, against the scorer computed directly; the bad inputs a
user meets (one line naming the file, the record and the fix; exit 2; no results file)."""

import gzip
import json
import math
import os
import re

import numpy as np
import pytest
from eval_util import random_model

from lm import cli
from lm.errors import UserError
from lm.eval import evaluate, tasks
from lm.eval.scoring import Scorer

SETTINGS = tasks.Settings(limit=0, batch_size=4, max_new_tokens=4)


@pytest.fixture(scope='module')
def model(tmp_path_factory):
  return random_model(str(tmp_path_factory.mktemp('tok')))


def _write(path, text):
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
  return str(path)


def _jsonl(path, rows, compress=False):
  data = ''.join(json.dumps(r) + '\n' for r in rows).encode()
  with (gzip.open if compress else open)(path, 'wb') as f:
    f.write(data)
  return str(path)


MC = [{'goal': 'Open a jar', 'sol1': 'twist the lid', 'sol2': 'eat the lid', 'label': 0},
      {'goal': 'Dry hair', 'sol1': 'use a towel', 'sol2': 'use a rock', 'label': 1},
      {'goal': 'Cool tea', 'sol1': 'wait', 'sol2': 'boil it', 'label': 0}]


def test_builtin_tasks_are_task_files_shipped_with_the_package():
  names = tasks.builtin_tasks()
  assert set(names) >= {'gsm8k', 'gsm8k_nll', 'gsm8k_choice', 'alpaca', 'wiki_ppl', 'wiki_cloze',
                        'heldout_ppl'}
  kinds = {t.name: t.kind for t in tasks.parse_tasks(','.join(names))}
  assert kinds['gsm8k'] == 'generate' and kinds['wiki_cloze'] == 'choice'
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert 'task_files/*.yaml' in open(os.path.join(root, 'pyproject.toml')).read()


def test_perplexity_per_token_word_and_byte(model, tmp_path, capsys):
  texts = ['def f(x):\n    return x + 1', 'The list type holds items.']
  _write(tmp_path / 'held.txt', '\n\n'.join(texts) + '\n')
  _jsonl(tmp_path / 'held.jsonl.gz', [{'body': t} for t in texts], compress=True)
  _write(tmp_path / 'ppl_txt.yaml', 'kind: perplexity\ndata: held.txt\n')
  _write(tmp_path / 'ppl_gz.yaml', 'kind: perplexity\ndata: held.jsonl.gz\ntext: body\n')
  a = tasks.run(str(tmp_path / 'ppl_txt.yaml'), model, SETTINGS, progress=True)
  bar = capsys.readouterr().err  # a tqdm bar: label, count, elapsed<remaining
  # The count out of the total (the final 1/1 may be cleared before it is drawn) and the ETA.
  assert 'random ppl_txt' in bar and re.search(r'\b[01]/1\b', bar) and '<' in bar
  b = tasks.run(str(tmp_path / 'ppl_gz.yaml'), model, SETTINGS)
  docs = [model.tokenizer.encode(t, bos=True, eos=True) for t in texts]
  direct = model.scorer.perplexity(docs, batch_size=4)
  for out in (a, b):
    assert out['perplexity'] == pytest.approx(direct['perplexity']) and out['n'] == 2
    total = direct['nll'] * direct['tokens']
    assert out['bits_per_byte'] == pytest.approx(total / math.log(2) / sum(len(t.encode()) for t in texts))
    assert out['word_perplexity'] == pytest.approx(math.exp(total / sum(len(t.split()) for t in texts)))
    assert out['headline'] == 'perplexity'


def test_answer_perplexity_with_template_and_fewshot_file(model, tmp_path):
  rows = [{'q': 'What is 2 + 3?', 'a': '#### 5'}, {'q': 'What is 1 + 1?', 'a': '#### 2'}]
  _jsonl(tmp_path / 'test.jsonl', rows)
  _jsonl(tmp_path / 'train.jsonl', [{'q': 'What is 4 + 4?', 'a': '#### 8'}])
  _write(tmp_path / 'nll.yaml', 'kind: perplexity\ndata: test.jsonl\nprompt: "Q: {{q}}\\nA:"\n'
         'target: a\nfewshot: train.jsonl\n')
  out = tasks.run(str(tmp_path / 'nll.yaml'), model, tasks.Settings(limit=0, shots=1, batch_size=4))
  prefix = 'Q: What is 4 + 4?\nA: #### 8\n\n'
  requests = [tasks._split_encode(model.tokenizer, f'{prefix}Q: {r["q"]}\nA:', ' ' + r['a'])
              for r in rows]
  scores = model.scorer.score(requests)
  nll = -sum(s[0] for s in scores) / sum(s[1] for s in scores)
  assert out['answer_nll'] == pytest.approx(nll) and out['headline'] == 'answer_perplexity'


class _FixedGenerator:
  def __init__(self, outputs):
    self.outputs, self.prompts = outputs, None

  def generate(self, prompts, sampling, *, stop=(), seed=0, batch_size=16, progress=''):
    self.prompts, self.stop = prompts, stop
    return self.outputs[:len(prompts)]


def test_generate_exact_match_with_answer_pattern_and_text_metrics(model, tmp_path):
  rows = [{'question': 'What is 2 + 3?', 'answer': 'It is 5.'},
          {'question': 'What is 1 + 1?', 'answer': 'It is 2.'}]
  _jsonl(tmp_path / 'gen.jsonl', rows)
  _write(tmp_path / 'gen.yaml', 'kind: generate\ndata: gen.jsonl\nprompt: "Q: {{question}}\\nA:"\n'
         'target: answer\nanswer_pattern: "is (\\\\d+)"\nstop: ["Q:"]\nlimit: 5\n')
  fake = _FixedGenerator([' It is 5.', ' I think 3.'])
  model.__dict__['generator'] = fake
  try:
    out = tasks.run(str(tmp_path / 'gen.yaml'), model, SETTINGS)
  finally:
    del model.__dict__['generator']
  assert fake.prompts == ['Q: What is 2 + 3?\nA:', 'Q: What is 1 + 1?\nA:'] and fake.stop == ['Q:']
  assert out['exact_match'] == 50.0 and out['answered'] == 50.0 and out['n'] == 2
  assert out['examples'][0]['answer'] == '5' and out['examples'][1]['gold'] == '2'
  assert 0 < out['token_f1'] < 100 and 0 < out['rouge_l'] < 100 and out['headline'] == 'exact_match'


def _choice_figures(model, rows, labels):
  items = []
  for r, label in zip(rows, labels):
    ctx = f'Goal: {r["goal"]}\nSolution:'
    items.append((model.tokenizer.encode(ctx, bos=True),
                  [tasks._split_encode(model.tokenizer, ctx, ' ' + r[k])[1] for k in ('sol1', 'sol2')],
                  label))
  return model.scorer.multiple_choice(items)


def test_choice_label_field_label_text_and_label_file_agree(model, tmp_path):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  _jsonl(tmp_path / 'mc_text.jsonl', [{**r, 'label': r['sol1' if r['label'] == 0 else 'sol2']}
                                      for r in MC])
  _jsonl(tmp_path / 'mc_nolabel.jsonl', [{k: v for k, v in r.items() if k != 'label'} for r in MC])
  _write(tmp_path / 'labels.txt', ''.join(f'{r["label"]}\n' for r in MC))
  common = 'kind: choice\nprompt: "Goal: {{goal}}\\nSolution:"\nchoices: [sol1, sol2]\n'
  _write(tmp_path / 'a.yaml', common + 'data: mc.jsonl\nlabel: label\n')
  _write(tmp_path / 'b.yaml', common + 'data: mc_text.jsonl\nlabel: label\n')
  _write(tmp_path / 'c.yaml', common + 'data: mc_nolabel.jsonl\nlabel_file: labels.txt\n')
  _write(tmp_path / 'd.yaml', common + 'data: mc_nolabel.jsonl\nlabel_file: labels.txt\nrows: "1:"\n')
  expected = _choice_figures(model, MC, [r['label'] for r in MC])
  for name in 'abc':
    out = tasks.run(str(tmp_path / f'{name}.yaml'), model, SETTINGS)
    assert (out['accuracy'], out['accuracy_norm'], out['n']) == (
        expected['accuracy'], expected['accuracy_norm'], 3)
  # The label file follows the whole data file; `rows` slices both alike.
  tail = _choice_figures(model, MC[1:], [r['label'] for r in MC[1:]])
  out = tasks.run(str(tmp_path / 'd.yaml'), model, SETTINGS)
  assert (out['accuracy'], out['accuracy_norm'], out['n']) == (
      tail['accuracy'], tail['accuracy_norm'], 2)


def test_preference_rewards_against_the_reference(model, tmp_path):
  """HH-RLHF-form pairs; reward = beta * (log pi - log pi_ref) per reply, encoded as training
  encodes pairs. Against itself as reference every margin is 0."""
  pairs = [{'chosen': '\n\nHuman: Say hi.\n\nAssistant: Hi there.',
            'rejected': '\n\nHuman: Say hi.\n\nAssistant: No.'},
           {'chosen': '\n\nHuman: 2+2?\n\nAssistant: 4.', 'rejected': '\n\nHuman: 2+2?\n\nAssistant: 5.'}]
  _jsonl(tmp_path / 'hh.jsonl', pairs)
  _write(tmp_path / 'pref.yaml', 'kind: preference\ndata: hh.jsonl\nbeta: 0.5\n')
  other = random_model(os.path.dirname(model.tokenizer.path), seed=1)
  model.__dict__['reference_scorer'] = Scorer(other.cfg, other.params, mesh=other.mesh)
  try:
    out = tasks.run(str(tmp_path / 'pref.yaml'), model, SETTINGS)
    model.__dict__['reference_scorer'] = model.scorer
    same = tasks.run(str(tmp_path / 'pref.yaml'), model, SETTINGS)
  finally:
    del model.__dict__['reference_scorer']
  lines = []  # no train.init_from: no reward
  alone = evaluate.run_tasks(model, [str(tmp_path / 'pref.yaml')], SETTINGS, log=lines.append)['pref']
  assert alone['reference'] == 'none' and 'reward_accuracy' not in alone
  assert lines == [f'  random pref: reward_accuracy - ({alone["seconds"]:.0f} s)']
  assert '| random |  |' in evaluate.markdown_table({'random': {'pref': alone}})
  assert alone['logp_accuracy'] == out['logp_accuracy']
  assert out['n'] == 2 and out['beta'] == 0.5
  margin = 2 * out['reward_margin']  # mean over pairs of beta*(d_pi(c)-d_ref(c)) - (...)
  policy = out['chosen_logp'] - out['rejected_logp']
  assert out['chosen_reward'] - out['rejected_reward'] == pytest.approx(out['reward_margin'])
  assert margin != 0 and np.isfinite(policy)
  assert same['reward_margin'] == 0 and same['reward_accuracy'] == 0.0
  assert same['logp_accuracy'] == out['logp_accuracy']


def test_task_file_in_training_evaluation_and_early_stopping_names(model, tmp_path):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  path = _write(tmp_path / 'mine.yaml', 'name: piqa_mini\nkind: choice\ndata: mc.jsonl\n'
                'prompt: goal\nchoices: [sol1, sol2]\nlabel: label\n')
  cfg = model.cfg
  cfg.train.eval_tasks, cfg.train.eval_task_limit = path, 0
  evaluate_fn = evaluate.training_evaluator(cfg, model.spec, model.tokenizer, model.mesh)
  metrics = evaluate_fn(model.params)
  assert {'piqa_mini/accuracy', 'piqa_mini/accuracy_norm'} <= set(metrics)
  stopper = evaluate.EarlyStopping('piqa_mini/accuracy', patience=1)
  assert not stopper.lower_is_better and not stopper.update(1, metrics)


def _bad(tmp_path, name, yaml_text):
  return _write(tmp_path / name, yaml_text)


def test_bad_task_files_raise_one_line_naming_file_record_and_fix(model, tmp_path):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  base = 'kind: choice\ndata: mc.jsonl\nchoices: [sol1, sol2]\n'
  cases = {
      'missing_field.yaml': (base + 'prompt: "{{question}}"\nlabel: label\n',
                             ['mc.jsonl:1', "'question' is undefined", 'fix `prompt`']),
      'bad_label.yaml': (base + 'prompt: goal\nlabel: "{{label + 5}}"\n',
                         ['mc.jsonl:1', 'label 5 is outside the 2 choices']),
      'short_labels.yaml': (base + 'prompt: goal\nlabel_file: labels.txt\n',
                            ['labels.txt', '2 labels for 3 records', 'one label per record']),
      'no_kind.yaml': ('data: mc.jsonl\n', ['no_kind.yaml', 'set kind to one of']),
      'typo.yaml': (base + 'promt: goal\nlabel: label\n', ["unknown key(s) ['promt']"]),
      'bad_gz.yaml': ('kind: perplexity\ndata: broken.jsonl.gz\n',
                      ['broken.jsonl.gz', 'not a readable gzip file', 're-compress it']),
  }
  _write(tmp_path / 'labels.txt', '0\n1\n')
  (tmp_path / 'broken.jsonl.gz').write_bytes(b'\x1f\x8b\x08\x00not gzip at all')
  for name, (text, needles) in cases.items():
    path = _bad(tmp_path, name, text)
    with pytest.raises(UserError) as e:
      tasks.run(path, model, SETTINGS)
    message = str(e.value)
    assert '\n' not in message, name
    for needle in needles:
      assert needle in message, (name, message)


def test_cli_exits_2_and_writes_no_results_on_a_bad_record(model, tmp_path, monkeypatch, capsys):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  good = _write(tmp_path / 'good.yaml', 'kind: choice\ndata: mc.jsonl\nprompt: goal\n'
                'choices: [sol1, sol2]\nlabel: label\n')
  bad = _write(tmp_path / 'bad.yaml', 'kind: choice\ndata: mc.jsonl\nprompt: goal\n'
               'choices: [sol1, sol2]\nlabel: "{{label + 7}}"\n')
  monkeypatch.setattr(evaluate, 'load_model', lambda spec, mesh=None: model)
  out = tmp_path / 'out'
  assert cli.main(['eval', 'runs/x', '--tasks', f'{good},{bad}', '--out', str(out),
                   '--no-progress']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'mc.jsonl:1' in err and 'outside the 2 choices' in err
  assert not out.exists()
  assert cli.main(['eval', 'runs/x', '--tasks', good, '--out', str(out), '--no-progress']) == 0
  assert json.load(open(out / 'results.json'))['results']['random']['good']['n'] == 3


def test_compare_accepts_the_limit_its_usage_lists(monkeypatch, tmp_path):
  from lm.eval import compare
  seen = {}
  monkeypatch.setattr(compare, 'compare', lambda *a, **k: seen.update(k))
  assert cli.main(['compare', '--base', 'b', '--finetuned', 'f', '--out', str(tmp_path),
                   '--limit', '7', '--tasks', 'wiki_cloze', '--general', 'wiki_ppl',
                   '--base-pretraining-tokens', '2e12']) == 0
  assert seen['settings'].limit == 7 and [t.name for t in seen['task_names']] == ['wiki_cloze']
  assert seen['base_pretraining_tokens'] == 2e12
  for option in ('--limit', '--harness', '--base-pretraining-tokens'):
    assert option in cli.USAGE


# --- task files are data: sandboxed templates, a schema, selections that mean what they say ---

def test_a_template_cannot_run_code_and_says_so(model, tmp_path):
  """The exploit a plain jinja2.Environment lets through: a shell command from a task file."""
  _jsonl(tmp_path / 'd.jsonl', [{'q': 'a', 'a': 'b'}])
  marker = tmp_path / 'ran'
  path = _write(tmp_path / 'evil.yaml', 'kind: perplexity\ndata: d.jsonl\ntarget: a\nprompt: "{{ '
                f"cycler.__init__.__globals__.os.popen('touch {marker}').read() }}}}\"\n")
  with pytest.raises(UserError, match=r'd.jsonl:1: `prompt` in .*evil.yaml reaches outside the '
                                      r'record \(access to attribute'):
    tasks.run(path, model, SETTINGS)
  assert not marker.exists()


@pytest.mark.parametrize('source, needle', [
    ("{{ 'a' * 10**10 }}", 'at most 10000000 items'),
    ('{{ 10 ** 100000 }}', 'is too large for a template'),
    ('{{ 1 / 0 }}', 'ZeroDivisionError'),
    ("{{ q | regex_replace('(', '') }}", 'error: missing )'),
])
def test_a_template_that_fails_on_a_record_is_one_line(model, tmp_path, source, needle):
  _jsonl(tmp_path / 'd.jsonl', [{'q': 'a', 'a': 'b'}])
  path = _write(tmp_path / 't.yaml', f'kind: perplexity\ndata: d.jsonl\ntarget: a\nprompt: "{source}"\n')
  with pytest.raises(UserError) as e:
    tasks.run(path, model, SETTINGS)
  assert needle in str(e.value) and 'd.jsonl:1' in str(e.value) and '\n' not in str(e.value)


SCHEMA = {  # a task file's text (after the base) -> the message's fragment
    'limit: -1\n': 'limit is -1; it must be >= 0 (0: no cap)',
    'limit: 2.5\n': 'limit is 2.5; give a whole number >= 0',
    'limit: true\n': 'limit is True; give a whole number >= 0',
    'shots: -2\nfewshot: mc.jsonl\n': 'shots is -2; it must be >= 0',
    'rows: "1:2:3"\n': 'rows is \'1:2:3\'; write a slice such as "-500:" or ":100"',
    'prompt: "{{ goal "\n': '`prompt` is not a valid template',
    'stop: ["Q:"]\n': '`stop` is not read by a choice task; remove it',
    'label_file: nope.txt\n': 'both label and label_file are set',
    'headline: bleu\n': "headline is 'bleu', which a choice task does not report",
    'name: "a/b"\n': "name 'a/b' is not a plain name",
    'fewshot: {data: mc.jsonl, row: ":2"}\n': "fewshot has unknown key(s) ['row']",
    'fewshot: missing.jsonl\n': 'missing.jsonl not found; data is read relative to the task file',
    'data: "python:os:getcwd"\n': "would run Python code, and task files are data",
    'seed: "x"\n': "seed is 'x'; give a whole number",
}


@pytest.mark.parametrize('extra', list(SCHEMA))
def test_task_file_schema_refuses_before_anything_runs(tmp_path, extra):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  base = 'kind: choice\ndata: mc.jsonl\nprompt: goal\nchoices: [sol1, sol2]\nlabel: label\n'
  lines = {l.split(':')[0]: l for l in base.splitlines(True)}
  lines.update({l.split(':')[0]: l for l in extra.splitlines(True)})
  path = _write(tmp_path / 't.yaml', ''.join(lines.values()))
  with pytest.raises(UserError) as e:
    tasks.load_task(path)  # parsing alone: no model, no records read
  assert SCHEMA[extra] in str(e.value) and str(e.value).startswith(f'task file {path}: '), str(e.value)


def test_answer_patterns_are_compiled_when_the_file_loads(tmp_path):
  _jsonl(tmp_path / 'g.jsonl', [{'q': '1+1', 'a': '2'}])
  path = _write(tmp_path / 'g.yaml', 'kind: generate\ndata: g.jsonl\nprompt: q\ntarget: a\n'
                'answer_pattern: "(unclosed"\n')
  with pytest.raises(UserError, match=r"answer_pattern '\(unclosed' is not a valid regex \(missing \)"):
    tasks.load_task(path)


@pytest.mark.parametrize('rows, needle', [
    ('"2:1"', "rows '2:1' selects none of the 3 records of mc.jsonl; fix rows"),
    ('":10"', "rows ':10' reaches past the 3 records of mc.jsonl; keep its bounds within -3..3"),
    ('"-4:"', "rows '-4:' reaches past the 3 records"),
])
def test_a_selection_of_no_records_or_past_the_end_is_an_error(model, tmp_path, rows, needle):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  path = _write(tmp_path / 't.yaml', f'kind: choice\ndata: mc.jsonl\nprompt: goal\nchoices: '
                f'[sol1, sol2]\nlabel: label\nrows: {rows}\n')
  with pytest.raises(UserError, match=re.escape(needle)):
    tasks.run(path, model, SETTINGS)


def test_more_shots_than_the_fewshot_file_holds_is_an_error(model, tmp_path):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  path = _write(tmp_path / 't.yaml', 'kind: choice\ndata: mc.jsonl\nprompt: goal\nchoices: '
                '[sol1, sol2]\nlabel: label\nfewshot: {data: mc.jsonl, rows: ":2"}\nshots: 3\n')
  with pytest.raises(UserError, match='3 shots asked for but the fewshot data mc.jsonl holds 2 '
                                      'records; lower shots or add exemplars'):
    tasks.run(path, model, SETTINGS)
  assert tasks.run(path, model, tasks.Settings(limit=0, shots=2, batch_size=4))['n'] == 3


def test_python_hooks_run_only_from_built_in_files_and_fail_in_one_line(model, tmp_path, monkeypatch):
  import sys
  import types
  hooks = types.ModuleType('my_hooks')
  hooks.broken = lambda settings: [{'q': 1}][5]
  hooks.strings = lambda settings: ['not a record']
  monkeypatch.setitem(sys.modules, 'my_hooks', hooks)
  # A Task built in Python is code its author runs; a hook failing inside is still one line.
  task = tasks.Task(name='hook', path=str(tmp_path / 'x.yaml'), kind='perplexity',
                    data='python:my_hooks:broken')
  with pytest.raises(UserError, match=r'data hook python:my_hooks:broken failed: IndexError: '
                                      r'list index out of range; fix the hook or its data'):
    tasks.run(task, model, SETTINGS)
  with pytest.raises(UserError, match=r'returned a str at \[0\]; it must return records'):
    tasks.run(dataclasses_replace(task, data='python:my_hooks:strings'), model, SETTINGS)
  # The built-in files that use hooks still load (they are shipped, reviewed code).
  assert tasks.resolve('wiki_cloze').data.startswith('python:')


def dataclasses_replace(task, **changes):
  import dataclasses
  return dataclasses.replace(task, **changes)


def test_settings_refuse_negative_or_fractional_numbers():
  for bad, needle in [(dict(limit=-1), 'limit=-1: give a whole number >= 0 (0: every example)'),
                      (dict(shots=-1), 'shots=-1'), (dict(batch_size=0), 'batch_size=0'),
                      (dict(limit=2.5), 'limit=2.5'), (dict(temperature=float('nan')), 'temperature=nan')]:
    with pytest.raises(UserError, match=re.escape(needle)):
      tasks.Settings(**bad)


def test_a_limit_that_leaves_records_out_is_reported(model, tmp_path):
  _jsonl(tmp_path / 'mc.jsonl', MC)
  path = _write(tmp_path / 'mc.yaml', 'kind: choice\ndata: mc.jsonl\nprompt: goal\nchoices: '
                '[sol1, sol2]\nlabel: label\n')
  lines = []
  out = evaluate.run_tasks(model, [path], tasks.Settings(limit=2, batch_size=4), log=lines.append)
  assert out['mc']['n'] == 2 and out['mc']['available'] == 3
  assert lines[0].endswith('; 2 of 3 records (limit 2; --config.limit=0 for all))'), lines
  whole = evaluate.run_tasks(model, [path], tasks.Settings(limit=3, batch_size=4), log=lines.append)
  assert whole['mc']['n'] == 3 and 'available' not in whole['mc'] and 'records' not in lines[1]


def test_eval_output_is_checked_before_models_load_and_replaced_whole(model, tmp_path, monkeypatch):
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'config.json').write_text('{}')
  _jsonl(tmp_path / 'mc.jsonl', MC)
  good = _write(tmp_path / 'good.yaml', 'kind: choice\ndata: mc.jsonl\nprompt: goal\n'
                'choices: [sol1, sol2]\nlabel: label\n')
  loaded = []
  monkeypatch.setattr(evaluate, 'load_model', lambda spec, mesh=None: loaded.append(spec) or model)
  for out, needle in [(run, 'is the input this command reads'),
                      (run / 'evals', 'which this command reads; write outside it')]:
    with pytest.raises(UserError, match=needle):
      evaluate.evaluate_runs([str(run)], [good], SETTINGS, str(out), log=lambda *_: None)
  assert not loaded and sorted(os.listdir(run)) == ['checkpoints', 'config.json']
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'todo.txt').write_text('mine')
  with pytest.raises(UserError, match='is a folder of other files'):
    evaluate.evaluate_runs([str(run)], [good], SETTINGS, str(notes), log=lambda *_: None)
  out = tmp_path / 'eval'
  for _ in range(2):  # an earlier evaluation's folder is replaced whole
    evaluate.evaluate_runs([str(run)], [good], SETTINGS, str(out), log=lambda *_: None)
  assert sorted(os.listdir(out)) == ['.lm-output.json', 'items', 'results.json', 'results.md']
  assert sorted(os.listdir(tmp_path)) == ['eval', 'good.yaml', 'mc.jsonl', 'notes', 'run']


# --- perplexity's context stride, and every item's own figures ----------------------------------

def test_perplexity_stride_predicts_every_token_once_with_more_context(model):
  W = model.scorer.window()
  short = model.tokenizer.encode('The list type holds items.', bos=True, eos=True)[:W]
  long = model.tokenizer.encode(' '.join(['def f(x): return x + 1'] * 12), bos=True, eos=True)
  assert len(long) > 2 * W
  whole = model.scorer.perplexity([short])
  for stride in (1, 3, W - 1):
    out = model.scorer.perplexity([short, long], stride=stride)
    assert out['tokens'] == len(short) - 1 + len(long) - 1  # each token after the first, once
    # A document within one window sees its whole past under any stride.
    assert out['per_doc'][0][0] == pytest.approx(whole['per_doc'][0][0], rel=1e-5)
  assert model.scorer.perplexity([long]) == model.scorer.perplexity([long], stride=W - 1)
  with pytest.raises(ValueError, match=f'stride={W} must be in 1..{W - 1}'):
    model.scorer.perplexity([long], stride=W)


def test_a_stride_past_the_window_is_one_line(model, tmp_path):
  _write(tmp_path / 'held.txt', 'one two three\n\nfour five\n')
  path = _write(tmp_path / 'p.yaml', 'kind: perplexity\ndata: held.txt\nstride: 1000\n')
  with pytest.raises(UserError, match=r'task p: stride=1000 must be in 1\.\.16 .*; set `stride`'):
    tasks.run(path, model, SETTINGS)


def test_every_task_kind_saves_its_items(model, tmp_path):
  """items/MODEL/TASK.jsonl: one line per scored item, whose figures add up to the task's."""
  _jsonl(tmp_path / 'mc.jsonl', MC)
  _jsonl(tmp_path / 'gen.jsonl', [{'q': '1+1', 'a': '#### 2'}, {'q': '2+2', 'a': '#### 4'}])
  _write(tmp_path / 'held.txt', 'one two three\n\nfour five six seven\n')
  _jsonl(tmp_path / 'hh.jsonl', [{'prompt': 'Say hi.', 'chosen': 'Hi there.', 'rejected': 'No.'}])
  paths = [_write(tmp_path / 'mc.yaml', 'kind: choice\ndata: mc.jsonl\nprompt: goal\n'
                  'choices: [sol1, sol2]\nlabel: label\n'),
           _write(tmp_path / 'gen.yaml', 'kind: generate\ndata: gen.jsonl\nprompt: q\ntarget: a\n'
                  'answer_pattern: number\nmetrics: [exact_match]\nmax_new_tokens: 2\n'),
           _write(tmp_path / 'ppl.yaml', 'kind: perplexity\ndata: held.txt\nstride: 4\n'),
           _write(tmp_path / 'nll.yaml', 'kind: perplexity\ndata: gen.jsonl\nprompt: q\ntarget: a\n'),
           _write(tmp_path / 'pref.yaml', 'kind: preference\ndata: hh.jsonl\n')]
  results = {'random': evaluate.run_tasks(model, paths, SETTINGS, log=lambda *_: None)}
  evaluate.write_results(str(tmp_path / 'out'), results, {}, evaluate.markdown_table(results))
  saved = json.load(open(tmp_path / 'out' / 'results.json'))['results']['random']
  assert not any('items' in m for m in saved.values())

  def items(task):
    with open(tmp_path / 'out' / 'items' / 'random' / f'{task}.jsonl', encoding='utf-8') as f:
      return [json.loads(line) for line in f]

  mc = items('mc')
  assert len(mc) == 3 and [i['label'] for i in mc] == [0, 1, 0]
  assert 100 * sum(i['correct'] for i in mc) / 3 == pytest.approx(saved['mc']['accuracy'])
  assert all(len(i['logp']) == 2 and i['where'].startswith(str(tmp_path)) for i in mc)
  gen = items('gen')
  assert [i['gold'] for i in gen] == ['2', '4']
  assert 100 * sum(i['correct'] for i in gen) / 2 == saved['gen']['exact_match']
  ppl = items('ppl')
  assert sum(i['tokens'] for i in ppl) == saved['ppl']['tokens'] and saved['ppl']['stride'] == 4
  assert -sum(i['logp'] for i in ppl) / saved['ppl']['tokens'] == pytest.approx(saved['ppl']['nll'])
  nll = items('nll')
  assert -sum(i['logp'] for i in nll) / sum(i['tokens'] for i in nll) == pytest.approx(
      saved['nll']['answer_nll'])
  pref = items('pref')
  assert len(pref) == 1 and (pref[0]['chosen_logp'] > pref[0]['rejected_logp']) == (
      saved['pref']['logp_accuracy'] == 100.0)
