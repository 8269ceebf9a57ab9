"""Helpers for the data tests: the shared real files, small HF tokenizers and a local TFDS dataset."""

import json
import os

import pytest
from conftest import SHARED_DATA

from lm import config as config_lib

needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED_DATA),
                                  reason=f'shared data folder {SHARED_DATA} is absent')


def shared(*parts) -> str:
  return os.path.join(SHARED_DATA, *parts)


SHAKESPEARE = shared('tinyshakespeare', 'input.txt')
WIKI = shared('wiki-demo', 'wiki_demo.txt')
C4 = shared('c4-demo', 'c4_demo.jsonl')
ALPACA = shared('alpaca5k', 'alpaca_5000.json')
GSM8K = shared('gsm8k', 'train.jsonl')
DPO = shared('llamafactory-dpo-demo', 'dpo_en_demo.json')
LLAMA2 = shared('llama2-tokenizer', 'tokenizer.model')
MAXTEXT = shared('maxtext-tokenizers', 'tokenizer.default')


def head_lines(path: str, n: int) -> list[str]:
  with open(path, encoding='utf-8') as f:
    return [next(f) for _ in range(n)]


def slice_json(src: str, dst, n: int, start: int = 0) -> str:
  """The records [start, start + n) of a .json list or .jsonl file, written to dst (same format)."""
  if src.endswith('.jsonl'):
    with open(src, encoding='utf-8') as f:
      lines = f.readlines()[start:start + n]
    with open(dst, 'w', encoding='utf-8') as f:
      f.writelines(lines)
  else:
    with open(src, encoding='utf-8') as f:
      records = json.load(f)[start:start + n]
    with open(dst, 'w', encoding='utf-8') as f:
      json.dump(records, f)
  return str(dst)


def data_config(**data):
  c = config_lib.base_config()
  c.data.update(seq_len=128, batch_size=4, prefetch=0)
  c.data.update(data)
  return c


# Llama-3's pre-tokenizer split, so byte-level BPE behaves like the real Llama-3 / Qwen tokenizers.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
STYLES = {
    'llama3': dict(specials=['<|begin_of_text|>', '<|end_of_text|>', '<|start_header_id|>',
                             '<|end_header_id|>', '<|eot_id|>'],
                   config={'bos_token': '<|begin_of_text|>', 'eos_token': '<|eot_id|>',
                           'chat_template': LLAMA3_TEMPLATE}),
    'qwen': dict(specials=['<|endoftext|>', '<|im_start|>', '<|im_end|>'],
                 config={'bos_token': None, 'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>',
                         'chat_template': QWEN_TEMPLATE}),
}


def make_hf_tokenizer(directory, style: str = 'llama3', vocab_size: int = 600) -> str:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json) in the given model's style, trained
  on a slice of tinyshakespeare. Returns the folder. Skips the calling test where ../shared is
  absent, whether or not it is marked needs_shared."""
  if not os.path.isfile(SHAKESPEARE):
    pytest.skip(f'{SHAKESPEARE} is absent (the shared data folder; CI has it)')
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  spec = STYLES[style]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior='isolated'),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=spec['specials'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(head_lines(SHAKESPEARE, 3000), trainer=trainer)
  bos = spec['config'].get('bos_token')
  if bos:  # as Llama 3's tokenizer.json does: its post-processor starts a sequence with BOS
    from tokenizers import processors
    tok.post_processor = processors.TemplateProcessing(
        single=f'{bos} $A', pair=f'{bos} $A $B', special_tokens=[(bos, tok.token_to_id(bos))])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, 'tokenizer.json'))
  with open(os.path.join(directory, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(spec['config'], f)
  return str(directory)


def make_tfds(data_dir, docs: list[str], name: str = 'lm_test_text') -> str:
  """A local TFDS dataset (array_record files, built without TensorFlow) with train and
  validation splits of {'text': ...}. Returns its name."""
  import numpy as np
  import tensorflow_datasets as tfds
  dataset_name = name

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = dataset_name
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'text': tfds.features.Text(), 'id': tfds.features.Scalar(dtype=np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      cut = len(docs) * 9 // 10
      return {'train': self._generate_examples(0, cut), 'validation': self._generate_examples(cut, len(docs))}

    def _generate_examples(self, start=0, stop=0):
      for i in range(start, stop):
        yield i, {'text': docs[i], 'id': i}

  Builder(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  return name
