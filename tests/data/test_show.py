"""`lm data show` and the pipeline benchmark."""

import json
import os
import re

from conftest import ROOT
from data_util import ALPACA, LLAMA2, SHAKESPEARE, head_lines, needs_shared, slice_json

from lm import cli
from lm.bench import data as bench
from lm.data import tokenizer as tokenizer_lib
from lm.data.show import render

pytestmark = needs_shared
QUICKSTART = os.path.join(ROOT, 'configs', 'quickstart.py')


def test_render_marks_untrained_text():
  tok = tokenizer_lib.load(LLAMA2)
  ids = [tok.bos_id] + tok.encode('Question: hi?') + tok.encode('Answer here.') + [tok.eos_id]
  n_prompt = 1 + len(tok.encode('Question: hi?'))
  trained = [False] * n_prompt + [True] * (len(ids) - n_prompt)
  assert render(tok, ids, trained) == '⟦<s>Question: hi?⟧ Answer here.</s>'


def test_data_show_prints_masked_examples_and_packing(tmp_path, capsys):
  path = slice_json(ALPACA, tmp_path / 'alpaca.json', 80)
  code = cli.main(['data', 'show', '--config', QUICKSTART, '--examples', '2', '--batches', '2',
                   f'--config.data.train_files={path}', '--config.data.format=alpaca',
                   '--config.data.chat_template=llama3', f'--config.data.tokenizer={LLAMA2}',
                   '--config.model.vocab_size=32000'])
  out = capsys.readouterr().out
  assert code == 0
  assert re.search(r'packing efficiency \d+\.\d%', out) and 'text the loss ignores is inside ⟦ ⟧' in out
  examples = [block for block in out.split('--- row ')[1:]]
  assert len(examples) == 2
  with open(path, encoding='utf-8') as f:
    outputs = [r['output'] for r in json.load(f)]
  for block in examples:
    text = block.split('\n', 1)[1]
    assert text.startswith('⟦<s><|start_header_id|>')  # the prompt is marked as not trained
    trained = re.sub('⟦.*?⟧', '', text, flags=re.S)  # what the loss sees: an answer and its </s>
    assert any(trained.strip() == o.strip() + '</s>' for o in outputs)


def test_data_show_reports_errors_in_one_line(tmp_path, capsys):
  code = cli.main(['data', 'show', '--config', QUICKSTART, f'--config.data.train_files={tmp_path}/none.jsonl'])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith('lm: error:') and 'not found' in err and err.count('\n') == 1


def test_bench_prints_pipeline_tokens_per_s(tmp_path, capsys):
  text = tmp_path / 'text.txt'
  text.write_text(''.join(head_lines(SHAKESPEARE, 2000)))
  bench.main(['--config', QUICKSTART, '--batches', '5', '--no-step', '--workdir', str(tmp_path),
              f'--config.data.train_files={text}', f'--config.data.tokenizer={LLAMA2}',
              '--config.model.vocab_size=32000'])
  out = capsys.readouterr().out
  assert re.search(r'pipeline: [\d,]+ tokens/s \(5 batches of 16 x 256', out)
