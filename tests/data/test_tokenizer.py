"""Tokenizers: real SentencePiece models load and round-trip, trained ones, HF tokenizer.json, and
explicit BOS/EOS/pad handling."""

import json
import os

import pytest
from data_util import C4, LLAMA2, MAXTEXT, SHAKESPEARE, head_lines, make_hf_tokenizer, needs_shared

from lm.data import pipeline
from lm.data import gguf_tokenizer
from lm.data import tokenizer as tokenizer_lib
from lm.errors import DataError


def _lines(n=300):
  return [line.rstrip('\n') for line in head_lines(SHAKESPEARE, n) if line.strip()]


@needs_shared
def test_llama2_model_loads_and_round_trips():
  tok = tokenizer_lib.load(LLAMA2)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, 0)  # no pad piece
  assert [tok.token_string(i) for i in tok.encode('Hello world! The quick brown fox.')] == \
      ['▁Hello', '▁world', '!', '▁The', '▁quick', '▁brown', '▁fo', 'x', '.']
  for text in _lines() + ['naïve café ☃ 𝄞 — ünïcödé', json.loads(head_lines(C4, 1)[0])['text'][:2000]]:
    assert tok.decode(tok.encode(text)) == text
  batch = tok.encode_batch(_lines(20))
  assert batch == [tok.encode(t) for t in _lines(20)]


@needs_shared
def test_maxtext_unigram_model_loads_and_round_trips():
  tok = tokenizer_lib.load(MAXTEXT)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32768, 1, 2)
  for text in _lines():  # NFKC-normal text: its normalizer changes nothing
    assert tok.decode(tok.encode(text)) == text


@needs_shared
def test_bos_eos_are_explicit_and_special_strings_stay_text():
  tok = tokenizer_lib.load(LLAMA2)
  plain = tok.encode('a </s> b')
  assert tok.bos_id not in plain and tok.eos_id not in plain  # never implicit, no injection
  assert tok.encode('hi', bos=True, eos=True) == [1] + tok.encode('hi') + [2]
  assert tok.encode('a</s>', specials=True) == tok.encode('a') + [2]  # for rendered templates only


@needs_shared
@pytest.mark.parametrize('model_type', ['bpe', 'unigram'])
def test_train_tokenizer_with_byte_fallback_and_special_tokens(tmp_path, model_type):
  docs = _lines(3000)
  tok = tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'sp.model'), 400, model_type,
                                      special_tokens=['<|im_start|>', '<|im_end|>'])
  assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (400, 0, 2, 3)
  assert tok.token_to_id('<|im_end|>') is not None
  assert tok.encode('x<|im_end|>y').count(tok.token_to_id('<|im_end|>')) == 1
  unseen = 'Zoë says 漢字 ☃'  # characters never seen in training: byte fallback, no <unk>
  assert tok.decode(tok.encode(unseen)) == unseen
  with pytest.raises(DataError, match='tokenizer_model_type'):
    tokenizer_lib.train_tokenizer(docs, str(tmp_path / 'x.model'), 400, 'wordpiece')


@needs_shared
def test_hf_tokenizer_json_llama3_style(tmp_path):
  folder = make_hf_tokenizer(tmp_path / 'llama3', 'llama3')
  tok = tokenizer_lib.load(folder)
  assert isinstance(tok, tokenizer_lib.HFTokenizer)
  assert tok.bos_id == tok.token_to_id('<|begin_of_text|>') and tok.eos_id == tok.token_to_id('<|eot_id|>')
  assert tok.pad_id == 0 and tok.chat_template.startswith('{% set loop_messages')
  for text in _lines(100) + ['naïve café ☃']:
    assert tok.decode(tok.encode(text)) == text
  # Special-token strings in a document are text; rendered templates opt in.
  assert tok.eos_id not in tok.encode('end <|eot_id|>')
  assert tok.encode('end<|eot_id|>', specials=True)[-1] == tok.eos_id
  assert tok.encode('hi', bos=True, eos=True) == [tok.bos_id] + tok.encode('hi') + [tok.eos_id]
  assert tok.encode_batch(['a b', 'c']) == [tok.encode('a b'), tok.encode('c')]
  assert tokenizer_lib.load(f'{folder}/tokenizer.json').vocab_size == tok.vocab_size


@needs_shared
def test_hf_tokenizer_qwen_style_has_no_bos(tmp_path):
  tok = tokenizer_lib.load(make_hf_tokenizer(tmp_path / 'qwen', 'qwen'))
  assert tok.bos_id is None and tok.eos_id == tok.token_to_id('<|im_end|>')
  assert tok.pad_id == tok.token_to_id('<|endoftext|>')
  assert tok.encode('hi', bos=True) == tok.encode('hi')  # no BOS to add


def test_bad_tokenizer_paths(tmp_path):
  with pytest.raises(DataError, match='not found'):
    tokenizer_lib.load(str(tmp_path / 'missing.model'))
  (tmp_path / 'junk.model').write_text('not a model')
  with pytest.raises(DataError, match='not a SentencePiece model'):
    tokenizer_lib.load(str(tmp_path / 'junk.model'))
  with pytest.raises(DataError, match='tiktoken'):
    tokenizer_lib.load('tokenizer_llama3.tiktoken')  # a missing file
  (tmp_path / 'tokenizer.json').write_text('{}')
  with pytest.raises(DataError, match='not a Hugging Face tokenizer.json'):
    tokenizer_lib.load(str(tmp_path))


@needs_shared
def test_vocabulary_that_does_not_fit_the_model_is_a_data_error():
  tok = tokenizer_lib.load(LLAMA2)
  pipeline.check_vocab(tok, 32000)
  with pytest.raises(DataError, match='model.vocab_size=2048; set --config.model.vocab_size=32000'):
    pipeline.check_vocab(tok, 2048)


def test_tiktoken_rank_file_is_detected_and_has_llama3_specials(tmp_path):
  """Llama 3's tokenizer.model format: lines of base64 token and rank, read through tiktoken; the
  special tokens follow the ranked ones, as in Meta's tokenizer."""
  import base64
  from lm.data import chat
  ranked = [bytes([b]) for b in range(256)] + [b'th', b'he', b'the', b' t', b' the', b'in', b'ing']
  path = tmp_path / 'tokenizer.model'
  path.write_bytes(b''.join(base64.b64encode(t) + b' %d\n' % i for i, t in enumerate(ranked)))
  tok = tokenizer_lib.load(str(path))
  assert isinstance(tok, tokenizer_lib.TiktokenTokenizer)
  n = len(ranked)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (n + 256, n, n + 1)
  assert tok.token_to_id('<|eot_id|>') == n + 9 and tok.is_special(n + 9)
  assert tok.encode('the thing') == [258, 32, 256, 262]  # the | ' ' th ing: merges by rank
  text = 'the thing <|eot_id|> ünï'
  assert tok.decode(tok.encode(text)) == text
  assert n + 9 not in tok.encode(text) and n + 9 in tok.encode(text, specials=True)
  encoder = chat.ChatEncoder(chat.TEMPLATES['llama3'], tok)
  ids, mask = encoder.encode([{'role': 'user', 'content': 'hi'}, {'role': 'assistant', 'content': 'the'}])
  assert ids[0] == n and ids[mask].tolist() == [258, n + 9]
  # A SentencePiece model is not mistaken for one.
  assert not tokenizer_lib.is_tiktoken_file(LLAMA2) if os.path.isfile(LLAMA2) else True


@needs_shared
def test_add_bos_follows_the_tokenizers_own_settings(tmp_path):
  """Whether a sequence starts with BOS is the tokenizer's call, read where it says it."""
  import json
  llama3 = make_hf_tokenizer(tmp_path / 'llama3', 'llama3')  # its post-processor adds BOS
  assert tokenizer_lib.load(llama3).add_bos
  assert not tokenizer_lib.load(make_hf_tokenizer(tmp_path / 'qwen', 'qwen')).add_bos  # no BOS at all
  config = json.loads((tmp_path / 'llama3' / 'tokenizer_config.json').read_text())
  (tmp_path / 'llama3' / 'tokenizer_config.json').write_text(json.dumps({**config, 'add_bos_token': False}))
  off = tokenizer_lib.load(llama3)
  assert off.bos_id is not None and not off.add_bos  # tokenizer_config.json's explicit setting wins
  assert tokenizer_lib.load(LLAMA2).add_bos  # SentencePiece: BOS


def test_gguf_add_bos_follows_the_file_then_llama_cpps_defaults():
  from lm.data import gguf_tokenizer
  assert gguf_tokenizer.adds_bos({'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'llama-bpe'})
  assert not gguf_tokenizer.adds_bos({'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'smollm'})
  assert not gguf_tokenizer.adds_bos({'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'llama-bpe',
                                      'tokenizer.ggml.add_bos_token': False})
  assert gguf_tokenizer.adds_bos({'tokenizer.ggml.model': 'llama'})
  assert not gguf_tokenizer.adds_bos({'tokenizer.ggml.model': 'llama', 'tokenizer.ggml.add_bos_token': False})


def _bpe_tokenizer(directory, pre_tokenizer):
  """A byte-level BPE tokenizer.json with the given pre-tokenizer, trained on stdlib docs (with
  their numbers, so digit merges exist and the splits' digit rules show)."""
  import json
  import pydoc_data.topics
  import tokenizers
  from tokenizers import decoders, models, trainers
  from tokenizers import pre_tokenizers as pre
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizer(pre, tokenizers.Regex)
  tok.decoder = decoders.ByteLevel()
  docs = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)[:40]]
  docs += [f'{i} {i * 37} {i * 1234567} 19{i % 100:02d}' for i in range(300)]
  trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=['<|endoftext|>'],
                                initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(docs, trainer=trainer)
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump({'eos_token': '<|endoftext|>'}, f)
  return tokenizer_lib.load(str(directory))


def _split(regex):
  return lambda pre, Regex: pre.Sequence([pre.Split(Regex(regex), behavior='isolated'),
                                          pre.ByteLevel(add_prefix_space=False, use_regex=False)])


@pytest.mark.parametrize('name, pre_tokenizer', [
    ('llama-bpe', _split(gguf_tokenizer._LLAMA3_WORDS)),  # pylint: disable=protected-access
    ('qwen2', _split(gguf_tokenizer._QWEN2_WORDS)),  # pylint: disable=protected-access
    ('gpt-4o', _split(gguf_tokenizer._GPT4O_WORDS)),  # pylint: disable=protected-access
    ('smollm', lambda pre, Regex: pre.Sequence([pre.Digits(individual_digits=True),
                                                pre.ByteLevel(add_prefix_space=False)])),
    ('default', lambda pre, Regex: pre.ByteLevel(add_prefix_space=False)),  # GPT-2's own
])
def test_gguf_export_names_the_pre_tokenizer_that_tokenizes_the_same(tmp_path, name, pre_tokenizer):
  """The name written is the one under which the GGUF vocabulary, read back, gives the model's
  own ids on every probe string, and the probes tell each split from the others."""
  tok = _bpe_tokenizer(tmp_path / name, pre_tokenizer)
  fields = gguf_tokenizer.fields_for(tok)
  assert fields['tokenizer.ggml.pre'] == name
  kind, definition, config, _ = gguf_tokenizer.spec('x.gguf', fields)
  back = tokenizer_lib.HFTokenizer.from_json(definition, config, 'x.gguf')
  texts = list(gguf_tokenizer.PROBES) + ["I'm here: 2024-11-30, it's 12:30.\n\n\tDone"]
  assert [back.encode(t) for t in texts] == [tok.encode(t) for t in texts]
  # What export wrote before for all but Llama 3 and SmolLM2 ('default', GPT-2's split) would have
  # tokenized the probes differently ("don't I'll", "\n\n"), and llama-bpe GPT-2's and SmolLM2's.
  other = 'llama-bpe' if name in ('default', 'smollm') else 'default'
  wrong = tokenizer_lib.HFTokenizer.from_json(
      gguf_tokenizer.spec('x.gguf', {**fields, 'tokenizer.ggml.pre': other})[1], config, 'x.gguf')
  assert [wrong.encode(t) for t in gguf_tokenizer.PROBES] != [tok.encode(t) for t in gguf_tokenizer.PROBES]


def test_gguf_export_refuses_a_split_llama_cpp_would_not_reproduce(tmp_path):
  tok = _bpe_tokenizer(tmp_path / 'odd', _split(r'\w+|[^\w\s]+|\s+'))  # words swallow digits and _
  with pytest.raises(DataError, match='splits text in a way none of the llama.cpp pre-tokenizers'):
    gguf_tokenizer.fields_for(tok)
