"""Preference pairs: the DPO demo (sharegpt) and {prompt, chosen, rejected} jsonl."""

import json

import numpy as np
import pytest
from data_util import DPO, LLAMA2, data_config, needs_shared, slice_json

from lm.data import formats, packing, pipeline, preference
from lm.data import tokenizer as tokenizer_lib
from lm.data.show import segments
from lm.errors import DataError

pytestmark = needs_shared
KEYS = preference.pair_keys(packing.BATCH_KEYS)


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.load(LLAMA2)


def _check_pair_rows(batch, tok, replies=None):
  """Chosen and rejected rows: same segments, same prompt ids, weights exactly on the replies."""
  assert set(batch) == set(KEYS)
  for k in KEYS:
    assert batch[k].dtype == packing.DTYPES[k.split('_', 1)[1]]
  chosen = list(segments(batch, 'chosen_'))
  rejected = list(segments(batch, 'rejected_'))
  assert [r for r, _, _ in chosen] == [r for r, _, _ in rejected]  # pair j = segment j in both rows
  for (_, c_ids, c_mask), (_, r_ids, r_mask) in zip(chosen, rejected):
    p = int(np.argmax(c_mask))
    assert p == int(np.argmax(r_mask)) and p > 0
    np.testing.assert_array_equal(c_ids[:p], r_ids[:p])  # the shared prompt
    for mask in (c_mask, r_mask):  # one trained run: the reply and its end token (a newline may follow)
      assert np.count_nonzero(np.diff(mask[p:].astype(int))) <= 1
    if replies is not None:
      assert c_ids[c_mask].tolist()[:-1] in replies and c_ids[c_mask][-1] == tok.eos_id


def test_dpo_demo_pairs(tok, tmp_path):
  path = slice_json(DPO, tmp_path / 'dpo.json', 60)
  with open(path, encoding='utf-8') as f:
    replies = [tok.encode(r['chosen']['value']) for r in json.load(f)]
  cfg = data_config(train_files=path, format='preference', chat_template='chatml', seq_len=1024,
                    eval_fraction=0.1, truncate='skip')
  corpus = pipeline.build_corpus(cfg.data, tok)
  assert set(corpus.eval) == set(KEYS)
  it = pipeline.BatchIterator(corpus.train, 2, 0)
  for _ in range(4):
    _check_pair_rows(next(it), tok, replies)


def test_flat_prompt_chosen_rejected_jsonl_and_implicit_prompts(tok, tmp_path):
  path = tmp_path / 'pairs.jsonl'
  rows = [{'prompt': f'Is {i} even?', 'chosen': 'yes' if i % 2 == 0 else 'no',
           'rejected': 'no' if i % 2 == 0 else 'yes, certainly'} for i in range(20)]
  rows.append({'chosen': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello!'}],
               'rejected': [{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Go away.'}]})
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  enc = formats.Encoder('preference', tok, 64, chat_template='plain')
  (items, note) = enc(rows[-1])
  ((c_ids, c_mask), (r_ids, r_mask)), = items
  assert note is None and c_ids[c_mask].tolist() == tok.encode('Hello!') + [tok.eos_id]
  assert r_ids[r_mask].tolist() == tok.encode('Go away.') + [tok.eos_id]
  cfg = data_config(train_files=str(path), format='preference', packing='whole', seq_len=128,
                    eval_fraction=0.1)
  corpus = pipeline.build_corpus(cfg.data, tok)
  batch = next(pipeline.BatchIterator(corpus.train, 2, 0))
  assert batch['chosen_segment_ids'].max() > 1  # packing 'whole' puts several pairs in a row
  _check_pair_rows(batch, tok)


def test_long_pairs_cut_the_shared_prompt_or_are_skipped(tok):
  enc = formats.Encoder('preference', tok, 32, chat_template='plain')
  record = {'prompt': 'word ' * 100, 'chosen': 'short', 'rejected': 'a bit longer reply'}
  ((c_ids, c_mask), (r_ids, r_mask)), = enc(record)[0]
  assert max(len(c_ids), len(r_ids)) == 33 and enc(record)[1] == 'truncated'
  p = int(np.argmax(c_mask))
  np.testing.assert_array_equal(c_ids[:p], r_ids[:p])
  assert r_ids[r_mask].tolist() == tok.encode('a bit longer reply') + [tok.eos_id]
  assert enc({'prompt': 'q', 'chosen': 'word ' * 100, 'rejected': 'x'}) == ([], formats.SKIP_ANSWER_TOO_LONG)


def test_bad_preference_records(tok, tmp_path):
  enc = formats.Encoder('preference', tok, 64)
  assert 'no field' in enc.check({'prompt': 'q', 'chosen': 'a'})[0]
  assert 'no prompt' in enc.check({'chosen': 'a', 'rejected': 'b'})[0]
  problem, fatal = enc.check({'prompt': 'q', 'chosen': '', 'rejected': 'b'})
  assert 'empty' in problem and not fatal
  path = tmp_path / 'p.jsonl'
  path.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
  with pytest.raises(DataError, match=rf'{path}:2: no field .rejected.'):
    pipeline.build_corpus(data_config(train_files=str(path), format='preference').data, tok)
  with pytest.raises(Exception, match='cannot combine preference'):
    pipeline.source_specs(data_config(mixture=({'train_files': 'a', 'format': 'preference'},
                                               {'train_files': 'b'})).data)
