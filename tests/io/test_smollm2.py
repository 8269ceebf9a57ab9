"""A real llama.cpp model: SmolLM2-135M-Instruct (Q4_1 GGUF, ../shared/data/smollm2-135m-instruct).

Most tests use a 2-layer slice of the file (its quantized blocks copied as they are), which loads in
seconds; the greedy chat test needs the whole model and loads it once for this module."""

import os

import jax
import numpy as np
import pytest
from conftest import SHARED_DATA, one_device_mesh

gguf = pytest.importorskip('gguf')

import lm  # noqa: E402
from lm.data import chat, tokenizer as tokenizer_lib  # noqa: E402
from lm.eval.generate import Sampling  # noqa: E402

DIRECTORY = os.path.join(SHARED_DATA, 'smollm2-135m-instruct')
FILE = os.path.join(DIRECTORY, 'SmolLM2-135M-Instruct.Q4_1.gguf')
pytestmark = pytest.mark.skipif(not os.path.isfile(FILE), reason=f'{FILE} is absent')

TEXTS = ['Hello world! 12345 The café\'s  spaces\n\nnew lines\tand tabs',
         'def f(x):\n    return x ** 2  # squares', 'Ünïcödé — “quotes” and emoji 🙂 ok',
         '<|im_start|>user\nHi<|im_end|>\n']


def write_slice(source: str, out: str, n_layers: int) -> str:
  """The first `n_layers` blocks of GGUF file `source` (and every non-block tensor, all metadata)
  as a new GGUF file; tensors keep their stored type and bytes."""
  reader = gguf.GGUFReader(source)
  arch = reader.fields['general.architecture'].contents()
  writer = gguf.GGUFWriter(out, arch)
  for key, field in reader.fields.items():
    if key.startswith('GGUF.') or key == 'general.architecture':
      continue
    value = n_layers if key == f'{arch}.block_count' else field.contents()
    sub = field.types[1] if len(field.types) > 1 else None
    writer.add_key_value(key, value, field.types[0], sub_type=sub)
  for t in reader.tensors:
    if t.name.startswith('blk.') and int(t.name.split('.')[1]) >= n_layers:
      continue
    quantized = t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type if quantized else None)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return out


@pytest.fixture(scope='module')
def sliced(tmp_path_factory):
  directory = tmp_path_factory.mktemp('smollm2_slice')
  return write_slice(FILE, str(directory / 'smollm2-2layers.gguf'), 2)


@pytest.fixture(scope='module')
def tokenizer():
  return tokenizer_lib.load(FILE)


def test_tokenizer_round_trips_and_is_the_embedded_vocabulary(tokenizer):
  tokens = gguf.GGUFReader(FILE).fields['tokenizer.ggml.tokens'].contents()
  assert tokenizer.vocab_size == len(tokens) == 49152
  assert [tokenizer.token_string(i) for i in range(0, 49152, 97)] == tokens[::97]
  assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
  assert tokenizer.token_to_id('<|im_end|>') == 2 and tokenizer.is_special(2)
  for text in TEXTS:
    assert tokenizer.decode(tokenizer.encode(text)) == text
  # Special-token strings are text unless asked for (a document cannot inject a turn end).
  assert 2 not in tokenizer.encode(TEXTS[3]) and 2 in tokenizer.encode(TEXTS[3], specials=True)
  assert tokenizer.encode(' 2024') == [216, 34, 32, 34, 36]  # smollm splits digits one by one
  # The file says tokenizer.ggml.add_bos_token = false: training text, prompts and evaluation
  # contexts start without BOS, as llama.cpp and transformers read this model.
  assert tokenizer.bos_id == 1 and not tokenizer.add_bos


def test_tokenizer_matches_transformers_reading_the_same_file(tokenizer):
  transformers = pytest.importorskip('transformers')
  reference = transformers.AutoTokenizer.from_pretrained(
      DIRECTORY, gguf_file=os.path.basename(FILE))
  for text in TEXTS:
    assert tokenizer.encode(text, specials=True) == reference.encode(text, add_special_tokens=False)


def test_logits_match_transformers_on_the_same_dequantized_weights(sliced):
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  model = lm.load_model(sliced, mesh=one_device_mesh())
  m = model.cfg.model
  assert (m.n_layers, m.d_model, m.n_heads, m.n_kv_heads, m.mlp_dim, m.vocab_size) == (
      2, 576, 9, 3, 1536, 49152)
  assert (m.rope_theta, m.tie_embeddings, m.max_seq_len) == (100000.0, True, 8192)
  tokens = np.asarray(model.tokenizer.encode(' '.join(TEXTS))[:32], np.int32).reshape(2, 16)
  got = np.asarray(jax.jit(lambda p: model.spec.bind(p)(tokens))(model.params))
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(sliced), gguf_file=os.path.basename(sliced), dtype=torch.float32).eval()
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
  diff = float(np.max(np.abs(got - expected)))
  print(f'SmolLM2 2-layer slice: max |dlogit| lm vs transformers {diff:.2e} '
        f'(logits up to {np.max(np.abs(expected)):.1f})')
  assert diff <= 1e-3


def test_chat_template_is_the_embedded_one(tokenizer):
  template = chat.get_template('auto', tokenizer)
  assert isinstance(template, chat.JinjaTemplate)
  encoder = chat.ChatEncoder(template, tokenizer)
  ids = encoder.encode_prompt([{'role': 'user', 'content': 'Hi'}])
  text = tokenizer.decode(ids)
  assert text.startswith('<|im_start|>system\nYou are a helpful AI assistant named SmolLM')
  assert text.endswith('<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n')
  assert ids.tolist() == tokenizer.encode(text, specials=True)


def test_greedy_chat_answer_is_sensible_and_stable():
  """The whole model (30 layers): a chat-templated question, answered greedily, twice."""
  model = lm.load_model(FILE, mesh=one_device_mesh())
  messages = [{'role': 'user', 'content': 'What is the capital of France?'}]
  encoder = chat.ChatEncoder(chat.get_template('auto', model.tokenizer), model.tokenizer)
  prompt = encoder.encode_prompt(messages).tolist()
  sampling = Sampling(max_new_tokens=8)  # 'The capital of France is Paris' fits
  first = model.generator.generate_ids([prompt], sampling, stop_ids=[[i] for i in encoder.stop_ids()])
  again = model.generator.generate_ids([prompt], sampling, stop_ids=[[i] for i in encoder.stop_ids()])
  answer = model.tokenizer.decode(first[0])
  print(f'SmolLM2 greedy answer: {answer!r}')
  assert first == again and 'Paris' in answer


def test_named_chatml_template_matches_the_embedded_jinja_one(tokenizer):
  messages = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Who are you?'},
              {'role': 'assistant', 'content': 'SmolLM.'}, {'role': 'user', 'content': 'Sure?'},
              {'role': 'assistant', 'content': 'Yes, quite sure.'}]
  named = chat.ChatEncoder(chat.get_template('chatml', tokenizer), tokenizer)
  embedded = chat.ChatEncoder(chat.get_template('tokenizer', tokenizer), tokenizer)
  (ids_n, mask_n), (ids_e, mask_e) = named.encode(messages), embedded.encode(messages)
  np.testing.assert_array_equal(ids_n, ids_e)
  np.testing.assert_array_equal(mask_n, mask_e)
  assert named.stop_ids() == [2]


def test_hf_export_of_a_gguf_run_writes_its_tokenizer_as_hf_files(tokenizer, tmp_path):
  """`lm export --format hf` of a run started from the GGUF: the embedded vocabulary and chat
  template become tokenizer.json and tokenizer_config.json."""
  from lm.io import pretrained
  pretrained._write_gguf_tokenizer(FILE, str(tmp_path))  # pylint: disable=protected-access
  written = tokenizer_lib.load(str(tmp_path))
  assert (written.bos_id, written.eos_id, written.chat_template, written.add_bos) == (
      tokenizer.bos_id, tokenizer.eos_id, tokenizer.chat_template, False)
  for text in TEXTS:
    assert written.encode(text, specials=True) == tokenizer.encode(text, specials=True)
