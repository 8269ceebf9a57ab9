"""`lm bench decode --model`: lm's KV-cache decoding beside transformers' generate on the same
weights. The docs check runs the page's command on SmolLM2 without the transformers column (its
GGUF loader took half of that command's time); this runs both columns on a tiny HF model."""

import re

import os

import pytest
from conftest import SHARED_DATA

from lm.bench import decode


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason='needs ../shared/data (CI has it)')
def test_decode_bench_prints_lm_beside_transformers(tmp_path, capsys):
  from data_util import make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  from hf_util import COMMON, random_hf_model  # pylint: disable=import-outside-toplevel
  make_hf_tokenizer(tmp_path / 'hf', vocab_size=600)
  random_hf_model('LlamaConfig', {**COMMON, 'vocab_size': 600}, tmp_path / 'hf',
                  lambda name: (1.0 if name.endswith('norm.weight') else 0.0, 0.2))
  assert decode.main(['--model', str(tmp_path / 'hf'), '--batch', '1,2', '--prompt-len', '4',
                      '--new-tokens', '3', '--reps', '1']) == 0
  rows = [line for line in capsys.readouterr().out.splitlines() if re.match(r'\| \d', line)]
  assert [r.split(' | ')[0] for r in rows] == ['| 1', '| 2']
  for row in rows:  # batch, lm tok/s, HF tok/s, ratio, lm prefill ms, HF prefill ms: all figures
    cells = [c.strip() for c in row.strip('|').split('|')]
    assert len(cells) == 6 and '-' not in cells, row
    assert float(cells[1].replace(',', '')) > 0 and float(cells[2].replace(',', '')) > 0
    assert cells[3].endswith('x')
