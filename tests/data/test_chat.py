"""Instruction tuning: templates, exact answer masks, multi-turn, Jinja templates, truncation."""

import json

import numpy as np
import pytest
from data_util import (ALPACA, DPO, LLAMA2, data_config, make_hf_tokenizer, needs_shared,
                       slice_json)

from lm.data import chat, formats, pipeline
from lm.data import tokenizer as tokenizer_lib
from lm.data.show import segments
from lm.errors import DataError

pytestmark = needs_shared


@pytest.fixture(scope='module')
def llama2():
  return tokenizer_lib.load(LLAMA2)


@pytest.fixture(scope='module')
def hf_llama3(tmp_path_factory):
  return tokenizer_lib.load(make_hf_tokenizer(tmp_path_factory.mktemp('tok') / 'llama3', 'llama3'))


@pytest.fixture(scope='module')
def alpaca():
  with open(ALPACA, encoding='utf-8') as f:
    return [r for r in json.load(f)[:60] if r['output'].strip()]


def _end_id(encoder):
  """The id that closes an assistant turn under this template and tokenizer."""
  ids, mask = encoder.chat.encode([{'role': 'user', 'content': 'q'}, {'role': 'assistant', 'content': 'a'}])
  return int(ids[np.flatnonzero(mask)[-1]])


@pytest.mark.parametrize('template', ['llama3', 'chatml', 'gemma', 'mistral', 'plain'])
def test_sft_mask_covers_exactly_the_answer_tokens(llama2, alpaca, template):
  encoder = formats.Encoder('alpaca', llama2, seq_len=4096, chat_template=template)
  end = _end_id(encoder)
  assert end == llama2.eos_id  # llama2 has none of the markers: end of turn falls back to EOS
  for record in alpaca:
    (ids, mask), = encoder(record)[0]
    assert ids[mask].tolist() == llama2.encode(record['output']) + [end]
    # Everything before the answer is the prompt, untrained.
    assert not mask[:np.flatnonzero(mask)[0]].any()


def test_sft_masks_survive_packing(llama2, alpaca, tmp_path):
  path = slice_json(ALPACA, tmp_path / 'alpaca.json', 60)
  cfg = data_config(train_files=path, format='alpaca', chat_template='chatml', seq_len=512,
                    eval_fraction=0.1)
  corpus = pipeline.build_corpus(cfg.data, llama2)
  answers = {tuple(llama2.encode(r['output']) + [llama2.eos_id]) for r in alpaca}
  it = pipeline.BatchIterator(corpus.train, 4, 0)
  seen = 0
  for _ in range(4):
    batch = next(it)
    assert batch['segment_ids'].max() > 1  # several examples per row
    for _, ids, trained in segments(batch):
      assert tuple(ids[trained].tolist()) in answers  # whole answers, nothing else
      seen += 1
  assert seen > 16


def test_named_template_matches_its_jinja_original(hf_llama3):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Who are you?'},
              {'role': 'assistant', 'content': 'A test.'}, {'role': 'user', 'content': 'Sure?'},
              {'role': 'assistant', 'content': 'Yes, quite sure.'}]
  named = chat.ChatEncoder(chat.get_template('llama3', hf_llama3), hf_llama3)
  jinja = chat.ChatEncoder(chat.get_template('auto', hf_llama3), hf_llama3)
  assert isinstance(jinja.template, chat.JinjaTemplate)
  (ids_n, mask_n), (ids_j, mask_j) = named.encode(messages), jinja.encode(messages)
  np.testing.assert_array_equal(ids_n, ids_j)
  np.testing.assert_array_equal(mask_n, mask_j)
  eot = hf_llama3.eos_id
  assert ids_n[mask_n].tolist() == (hf_llama3.encode('A test.') + [eot]
                                    + hf_llama3.encode('Yes, quite sure.') + [eot])
  np.testing.assert_array_equal(named.encode_prompt(messages[:2]), jinja.encode_prompt(messages[:2]))
  assert named.stop_ids() == [eot]


def test_jinja_ids_match_transformers_apply_chat_template(hf_llama3, tmp_path):
  transformers = pytest.importorskip('transformers')
  folder = make_hf_tokenizer(tmp_path / 'qwen', 'qwen')
  qwen = tokenizer_lib.load(folder)
  hf = transformers.PreTrainedTokenizerFast(tokenizer_file=f'{folder}/tokenizer.json')
  hf.chat_template = qwen.chat_template
  messages = [{'role': 'user', 'content': 'What is 2+2?'}, {'role': 'assistant', 'content': 'Four.'}]
  ids, mask = chat.ChatEncoder(chat.get_template('auto', qwen), qwen).encode(messages)
  expected = hf.apply_chat_template(messages, tokenize=True)
  expected = expected['input_ids'] if isinstance(expected, dict) or hasattr(expected, 'keys') else expected
  assert ids.tolist() == list(expected)
  assert ids[mask].tolist() == qwen.encode('Four.') + [qwen.token_to_id('<|im_end|>')]
  del hf_llama3


def test_multi_turn_sharegpt_trains_on_assistant_turns(llama2, tmp_path):
  with open(DPO, encoding='utf-8') as f:
    records = [r for r in json.load(f) if sum(m['from'] == 'gpt' for m in r['conversations']) >= 1][:10]
  path = tmp_path / 'chat.jsonl'
  path.write_text(''.join(json.dumps({'conversations': r['conversations'] + [r['chosen']]}) + '\n'
                          for r in records))
  for train_on in ('assistant', 'last', 'all'):
    encoder = formats.Encoder('chat', llama2, 8192, chat_template='chatml', train_on=train_on)
    for r in records:
      turns = r['conversations'] + [r['chosen']]
      (ids, mask), = encoder(json.loads(json.dumps({'conversations': turns})))[0]
      replies = [m['value'] for m in turns if m['from'] == 'gpt']
      if train_on == 'all':
        assert mask[1:].all()
        continue
      if train_on == 'last':
        replies = replies[-1:]
      assert ids[mask].tolist() == sum((llama2.encode(t) + [llama2.eos_id] for t in replies), [])
  corpus = pipeline.build_corpus(data_config(train_files=str(path), format='chat', seq_len=1024,
                                             eval_fraction=0.2).data, llama2)
  assert next(pipeline.BatchIterator(corpus.train, 2, 0))['weights'].sum() > 0


def test_template_that_is_not_prefix_stable_is_refused(hf_llama3, tmp_path):
  path = tmp_path / 'tmpl.jinja'
  path.write_text("{{ messages|length }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
  encoder = chat.ChatEncoder(chat.get_template(str(path), hf_llama3), hf_llama3)
  with pytest.raises(DataError, match='prefix|named template'):
    encoder.encode([{'role': 'user', 'content': 'a'}, {'role': 'assistant', 'content': 'b'}])
  with pytest.raises(DataError, match='not a named template'):
    chat.get_template('vicuna', hf_llama3)


def test_truncation_keeps_the_answer_or_skips_and_counts(llama2):
  record = {'instruction': 'word ' * 300, 'input': '', 'output': 'The short answer.'}
  answer = llama2.encode('The short answer.') + [llama2.eos_id]
  enc = formats.Encoder('alpaca', llama2, seq_len=64, chat_template='llama3')
  (items, note) = enc(record)
  (ids, mask), = items
  assert note == 'truncated' and len(ids) == 65 and ids[0] == llama2.bos_id
  assert ids[mask].tolist() == answer  # the whole answer survives; the prompt lost its start
  skip = formats.Encoder('alpaca', llama2, seq_len=64, chat_template='llama3', truncate='skip')
  assert skip(record) == ([], formats.SKIP_TOO_LONG)
  fail = formats.Encoder('alpaca', llama2, seq_len=64, chat_template='llama3', truncate='fail')
  with pytest.raises(DataError, match='longer than data.seq_len'):
    fail(record)
  long_answer = {'instruction': 'Say it.', 'input': '', 'output': 'word ' * 300}
  assert enc(long_answer) == ([], formats.SKIP_ANSWER_TOO_LONG)  # never a silently cut answer


def test_truncated_and_skipped_examples_are_counted_in_the_metrics(llama2, tmp_path):
  records = [{'instruction': f'Question {i}: ' + 'word ' * (10 if i % 3 else 200), 'input': '',
              'output': 'word ' * (300 if i % 5 == 0 else 5)} for i in range(40)]
  path = tmp_path / 'd.json'
  path.write_text(json.dumps(records))
  corpus = pipeline.build_corpus(data_config(train_files=str(path), format='alpaca', seq_len=128,
                                             eval_fraction=0.1).data, llama2)
  assert 'answers longer than seq_len' in corpus.describe() and 'truncated' in corpus.describe()
  it = pipeline.BatchIterator(corpus.train, 2, 0)
  for _ in range(10):
    next(it)
  metrics = it.metrics()
  assert metrics['data/truncated'] > 0 and metrics['data/answers_longer_than_seq_len'] > 0
  assert metrics['data/tokens_d'] > 0


def test_empty_answers_are_skipped_and_reported_even_when_bad_records_fail(llama2, tmp_path):
  path = slice_json(ALPACA, tmp_path / 'alpaca.json', 2400)  # record 2335 has an empty output
  corpus = pipeline.build_corpus(data_config(train_files=path, format='alpaca').data, llama2)
  assert '1 empty instruction or output (first: ' in corpus.describe()
  assert 'alpaca.json[record 2335]' in corpus.describe()


CONVERSATION = [{'role': 'system', 'content': 'Be brief.'},
                {'role': 'user', 'content': 'Who wrote Hamlet?'},
                {'role': 'assistant', 'content': 'Shakespeare, in about 1600.'},
                {'role': 'user', 'content': 'And  Macbeth?\nSay more.'},
                {'role': 'assistant', 'content': 'He did, too.'}]


def _smollm2():
  from data_util import shared
  import os
  path = shared('smollm2-135m-instruct', 'SmolLM2-135M-Instruct.Q4_1.gguf')
  if not os.path.isfile(path):
    pytest.skip(f'{path} is absent')
  return tokenizer_lib.load(path)


@pytest.fixture(scope='module', params=['llama2', 'maxtext', 'smollm2'])
def real_tokenizer(request):
  from data_util import MAXTEXT
  if request.param == 'smollm2':
    return _smollm2()
  return tokenizer_lib.load({'llama2': LLAMA2, 'maxtext': MAXTEXT}[request.param])


def rendered_pieces(template, tokenizer, messages):
  """The conversation rendered as text (a marker the vocabulary lacks written as the bos/eos token
  it falls back to), cut where each answer starts."""
  pieces = ['']
  for text, answer, kind in template.spans(messages):
    if kind == 'template':
      for marker, fallback in template.markers.items():
        if tokenizer.token_to_id(marker) is None and fallback in ('bos', 'eos'):
          i = tokenizer.bos_id if fallback == 'bos' else tokenizer.eos_id
          text = text.replace(marker, '' if i is None else tokenizer.token_string(i))
    if answer is not None and kind == 'content':
      pieces.append('')
    pieces[-1] += text
  return pieces


@pytest.mark.parametrize('name', sorted(chat.TEMPLATES))
def test_named_templates_tokenize_as_the_rendered_string(real_tokenizer, name):
  """Reference: the tokenizer on the rendered string, special tokens as tokens, each answer
  tokenized from its own start (as mistral-common does, so an answer's ids are the tokenizer's ids
  for its text)."""
  encoder = chat.ChatEncoder(chat.TEMPLATES[name], real_tokenizer)
  ids, mask = encoder.encode(CONVERSATION)
  pieces = rendered_pieces(chat.TEMPLATES[name], real_tokenizer, CONVERSATION)
  expected = [i for p in pieces for i in real_tokenizer.encode(p, specials=True)]
  assert ids.tolist() == expected
  if name in ('chatml', 'qwen') and not hasattr(real_tokenizer, 'sp'):
    # SmolLM2's own template: the whole string, uncut, tokenizes the same (its newline before
    # each answer is a token of its own either way).
    assert ids.tolist() == real_tokenizer.encode(''.join(pieces), specials=True)
  answers = [m['content'] for m in CONVERSATION if m['role'] == 'assistant']
  trained = ids[mask].tolist()
  end = trained[-1]
  assert trained == real_tokenizer.encode(answers[0]) + [end] + real_tokenizer.encode(answers[1]) + [end]


def test_mistral_turn_has_no_lone_sentencepiece_spaces(llama2):
  """Mistral v1 (a Llama-2-like vocabulary without [INST] tokens): [INST] and the question are one
  string, as SentencePiece on the rendered string gives, not '[INST] ' + '▁' + 'question'."""
  encoder = chat.ChatEncoder(chat.TEMPLATES['mistral'], llama2)
  ids, _ = encoder.encode([{'role': 'user', 'content': 'Hello'}, {'role': 'assistant', 'content': 'Hi'}])
  lone = llama2.token_to_id('▁')
  assert lone not in ids.tolist()
  assert ids.tolist() == ([llama2.bos_id] + llama2.encode('[INST] Hello [/INST]') + llama2.encode('Hi')
                          + [llama2.eos_id])


def test_mistral_v3_inst_markers_are_control_tokens(tmp_path):
  """A Mistral v3 style vocabulary: [INST] = 3 and [/INST] = 4 are control tokens, emitted as such;
  the spaces around them are the word boundaries SentencePiece marks itself (mistral-common:
  <s>[INST]▁Hello[/INST]▁Hi</s>)."""
  import sentencepiece as spm
  from data_util import SHAKESPEARE, head_lines
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(head_lines(SHAKESPEARE, 2000)), model_prefix=str(tmp_path / 'v3'),
      vocab_size=400, model_type='bpe', unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      control_symbols=['[INST]', '[/INST]'], byte_fallback=True, minloglevel=2)
  tok = tokenizer_lib.load(str(tmp_path / 'v3.model'))
  assert (tok.token_to_id('[INST]'), tok.token_to_id('[/INST]')) == (3, 4)
  encoder = chat.ChatEncoder(chat.TEMPLATES['mistral'], tok)
  ids, mask = encoder.encode([{'role': 'user', 'content': 'Hello there'},
                              {'role': 'assistant', 'content': 'Hi'},
                              {'role': 'user', 'content': 'Bye'}, {'role': 'assistant', 'content': 'Go'}])
  assert ids.tolist() == ([1, 3] + tok.encode('Hello there') + [4] + tok.encode('Hi') + [2]
                          + [3] + tok.encode('Bye') + [4] + tok.encode('Go') + [2])
  assert ids[mask].tolist() == tok.encode('Hi') + [2] + tok.encode('Go') + [2]
  prompt = encoder.encode_prompt([{'role': 'user', 'content': 'Hello there'}]).tolist()
  assert prompt == [1, 3] + tok.encode('Hello there') + [4]


@pytest.mark.parametrize('source, needle', [
    ("{{ cycler.__init__.__globals__.os.popen('echo ran').read() }}", 'reaches outside the conversation'),
    ("{{ 'x' * 10**9 }}", 'at most 10000000 items'),
    ('{{ messages[0].content / 2 }}', 'failed on this conversation (TypeError'),
])
def test_a_chat_template_is_sandboxed_and_its_failures_are_data_errors(source, needle):
  template = chat.JinjaTemplate(source)
  with pytest.raises(DataError) as e:
    template.render([{'role': 'user', 'content': 'hi'}])
  assert needle in str(e.value) and '\n' not in str(e.value)
