"""The lm-eval-harness adapter offline: local harness task YAMLs over local jsonl files, run by
lm_eval's own evaluator on a random-weight lm model; requests agree with lm's scorer."""

import json
import os

import pytest
from eval_util import random_model

lm_eval = pytest.importorskip('lm_eval')  # the `eval` and `test` extras install it

from lm.eval import harness, tasks  # noqa: E402  pylint: disable=wrong-import-position
from lm.eval.generate import Sampling  # noqa: E402  pylint: disable=wrong-import-position

ROWS = [{'question': 'What is 2 + 3?', 'choices': ['5', '7', '9'], 'label': 0, 'answer': '5'},
        {'question': 'What colour is the sky?', 'choices': ['green', 'blue'], 'label': 1,
         'answer': 'blue'}]
TEXTS = ['def f(x):\n    return x + 1\n' * 6, 'The list type holds items.']


class _Request:
  def __init__(self, *args):
    self.args = args


@pytest.fixture(scope='module')
def adapter(tmp_path_factory):
  model = random_model(str(tmp_path_factory.mktemp('tok')))
  return harness.LMHarnessModel(model=model, batch_size=4, progress=False)


def test_requests_match_lms_scorer_and_generator(adapter):
  model = adapter.model
  got = adapter.loglikelihood([_Request('Question: 2+3?\nAnswer:', ' 5'), _Request('', 'Hello')])
  ctx, cont = tasks._split_encode(model.tokenizer, 'Question: 2+3?\nAnswer:', ' 5')
  (logp, _, greedy), = model.scorer.score([(ctx, cont)])
  assert got[0] == (pytest.approx(logp), greedy)
  (logp_empty, _, _), = model.scorer.score([([model.tokenizer.bos_id],
                                              model.tokenizer.encode('Hello'))])
  assert got[1][0] == pytest.approx(logp_empty)
  # Rolling: every token predicted once, in windows of model.max_seq_len (64) after BOS.
  rolling = adapter.loglikelihood_rolling([_Request(t) for t in TEXTS])
  for text, total in zip(TEXTS, rolling):
    ids = [model.tokenizer.bos_id] + model.tokenizer.encode(text)
    assert len(ids) <= 65 or text == TEXTS[0]
    if len(ids) <= 65:
      (whole, n, _), = model.scorer.score([(ids[:1], ids[1:])])
      assert total == pytest.approx(whole, rel=1e-5)
  assert len(model.tokenizer.encode(TEXTS[0])) > 64 and rolling[0] < 0
  outs = adapter.generate_until([_Request('Question: hi\nAnswer:', {'until': ['\n'], 'max_gen_toks': 5})])
  direct = model.generator.generate(['Question: hi\nAnswer:'], Sampling(max_new_tokens=5), stop=['\n'])
  assert outs == direct


def test_local_harness_yaml_tasks_run_offline(adapter, tmp_path, monkeypatch):
  monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_DATASETS_CACHE', str(tmp_path / 'hf_cache'))
  with open(tmp_path / 'qa.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in ROWS)
  with open(tmp_path / 'text.jsonl', 'w') as f:
    f.writelines(json.dumps({'text': t}) + '\n' for t in TEXTS)
  common = ('dataset_path: json\ndataset_kwargs:\n  data_files: {test: %s}\ntest_split: test\n'
            'doc_to_text: "Question: {{question}}\\nAnswer:"\n')
  (tmp_path / 'mc.yaml').write_text(
      'task: local_mc\n' + common % (tmp_path / 'qa.jsonl') + 'output_type: multiple_choice\n'
      'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n'
      '    aggregation: mean\n    higher_is_better: true\n')
  (tmp_path / 'gen.yaml').write_text(
      'task: local_gen\n' + common % (tmp_path / 'qa.jsonl') + 'output_type: generate_until\n'
      'doc_to_target: answer\ngeneration_kwargs: {until: ["\\n"], max_gen_toks: 4}\n'
      'metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n')
  (tmp_path / 'ppl.yaml').write_text(
      'task: local_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: %s}\n'
      'test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: text\n'
      'metric_list:\n  - metric: bits_per_byte\n' % (tmp_path / 'text.jsonl'))
  names = harness.parse_tasks(','.join(str(tmp_path / f'{t}.yaml') for t in ('mc', 'gen', 'ppl')))
  # Task files of one's own: lm-eval indexes their folder, not the ~14,700 tasks it ships.
  assert set(harness.task_manager(names).all_tasks) == {'local_mc', 'local_gen', 'local_ppl'}
  out = harness.run_harness(adapter.model, names, tasks.Settings(limit=0, batch_size=4),
                            progress=False)
  assert set(out) == {'local_mc', 'local_gen', 'local_ppl'}
  assert out['local_mc']['headline'] == 'acc' and 0 <= out['local_mc']['acc'] <= 1
  assert out['local_mc']['n'] == 2 and out['local_gen']['n'] == 2
  assert 0 <= out['local_gen']['exact_match'] <= 1 and out['local_ppl']['bits_per_byte'] > 0


def test_registered_as_harness_model_lm():
  from lm_eval.api.registry import get_model
  assert get_model('lm') is harness.LMHarnessModel
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert 'lm-eval==0.4.13' in open(os.path.join(root, 'pyproject.toml')).read()


def test_only_task_files_that_stand_alone_skip_lm_evals_own_index(tmp_path):
  (tmp_path / 'one.yaml').write_text('task: mine\ndataset_path: json\n')
  (tmp_path / 'group.yaml').write_text('group: mine_and_arc\ntask:\n  - mine\n  - arc_easy\n')
  (tmp_path / 'code.yaml').write_text('task: coded\nprocess_docs: !function utils.process\n')
  (tmp_path / 'more.yaml').write_text('include: one.yaml\ntask: more\n')
  one, group, code, more = (str(tmp_path / f'{n}.yaml') for n in ('one', 'group', 'code', 'more'))
  assert not harness.needs_bundled_index([one])
  for tasks_ in ([one, group], [code], [more], [one, 'hellaswag'], []):
    assert harness.needs_bundled_index(tasks_), tasks_
