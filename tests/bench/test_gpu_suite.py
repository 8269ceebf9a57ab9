"""The GPU suite's whole path (attention table, train steps, JSON and markdown) at --smoke sizes on
CPU: it must be ready to run the day a GPU is at hand. Figures here say nothing about speed."""

import json

from lm import cli


def test_the_suite_writes_json_and_markdown(tmp_path, capsys):
  assert cli.main(['bench', 'gpu', '--out', str(tmp_path), '--smoke', '--iters', '1', '--steps', '1']) == 0
  report = json.loads((tmp_path / 'gpu_suite.json').read_text())
  assert {(r['case'], r['impl']) for r in report['attention']} == {
      (c, i) for c in ('causal', 'packed', 'gqa') for i in ('pallas', 'cudnn', 'xla')}
  ran = [r for r in report['attention'] if 'ms' in r]
  assert {r['impl'] for r in ran} == {'pallas', 'xla'} and all(r['tflops'] > 0 for r in ran)
  assert all(r['skipped'] for r in report['attention'] if r['impl'] == 'cudnn')  # CPU
  assert [r['impl'] for r in report['train'] if 'tokens_per_s' in r] == ['pallas', 'xla']
  text = (tmp_path / 'gpu_suite.md').read_text()
  assert '| packed | 128 |' in text and '| xla |' in text
  assert 'wrote' in capsys.readouterr().out
