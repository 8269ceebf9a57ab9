import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config
from data_util import make_hf_tokenizer, needs_shared

from lm.eval import generate as gen
from lm import sharding as sharding_lib
from lm.train.state import ModelSpec

PROMPTS = [[5, 9, 14, 3, 7, 30, 2], [11, 4], [8, 8, 21, 40, 17]]


def _model(**model):
  c = tiny_config(**model)
  spec = ModelSpec(c.model)
  return c, spec, jax.jit(spec.init)(jax.random.key(0))


def _left_pad(prompts, P, pad=0):
  tokens = np.full((len(prompts), P), pad, np.int32)
  for r, p in enumerate(prompts):
    tokens[r, P - len(p):] = p
  return tokens, np.array([len(p) for p in prompts], np.int32)


def _full_forward(spec, params, rows):
  """Logits of each row alone (right-padded into one batch; causality keeps padding out)."""
  T = max(map(len, rows))
  tokens = np.zeros((len(rows), T), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row
  return np.asarray(jax.jit(lambda p, x: spec.bind(p)(x))(params, tokens))


@pytest.mark.parametrize('variant', ['scan', 'unrolled', 'lora'])
def test_cached_logits_equal_full_forward(variant):
  """Prefill a left-padded batch, then decode token by token: every step's logits equal those of
  the full forward pass over the unpadded sequence (LoRA: with its adapters applied)."""
  c, spec, params = _model(scan_layers=variant != 'unrolled')
  if variant == 'lora':
    c.model.lora.update(rank=4, alpha=8.0)
    lora_spec = ModelSpec(c.model)
    lora = jax.jit(lora_spec.init)(jax.random.key(1))
    # B starts at zero; make the adapters change the output (numpy draws: no compile per shape).
    rng = np.random.default_rng(2)
    lora = {k: (v if k in params else (rng.normal(size=v.shape) * 0.5).astype(np.float32))
            for k, v in lora.items()}
    base_logits = _full_forward(spec, params, PROMPTS[:1])
    spec, params = lora_spec, {**lora, **params}
    assert not np.allclose(_full_forward(spec, params, PROMPTS[:1]), base_logits, atol=1e-3)
  model = jax.jit(lambda p, *args: spec.bind(p)(*args))
  rng = np.random.default_rng(0)
  continuations = rng.integers(3, c.model.vocab_size, (len(PROMPTS), 4)).astype(np.int32)
  P, N = 8, continuations.shape[1]
  tokens, lengths = _left_pad(PROMPTS, P)
  cache = gen.init_cache(c.model, len(PROMPTS), P + N)
  start = P - lengths
  real = np.arange(P)[None] >= start[:, None]
  positions = np.where(real, np.arange(P)[None] - start[:, None], 0).astype(np.int32)
  cache = gen._write(cache, jnp.int32(0), positions, real.astype(np.int32))
  logits, cache = model(params, tokens, positions, real.astype(np.int32), cache)
  step_logits = [logits[:, -1]]
  for t in range(N):
    pos = (lengths + t)[:, None]
    cache = gen._write(cache, jnp.int32(P + t), pos, np.ones_like(pos))
    logits, cache = model(params, continuations[:, t:t + 1], pos, np.ones_like(pos), cache)
    step_logits.append(logits[:, 0])
  full = _full_forward(spec, params, [p + continuations[r].tolist() for r, p in enumerate(PROMPTS)])
  for r, prompt in enumerate(PROMPTS):
    expected = full[r, len(prompt) - 1:len(prompt) + N]
    got = np.stack([np.asarray(s[r]) for s in step_logits])
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=2e-5)


@pytest.fixture(scope='module')
def greedy_reference():
  """Greedy generation of PROMPTS with no eos: (spec, params, tokens, lengths, out)."""
  c, spec, params = _model()
  tokens, lengths = _left_pad(PROMPTS, 8)
  fn = jax.jit(gen.make_generate_fn(spec, gen.Sampling(max_new_tokens=6), eos_id=-1, pad_id=0))
  out, n = fn(params, tokens, lengths, jax.random.key(0))
  assert np.all(np.asarray(n) == 6)
  return spec, params, tokens, lengths, np.asarray(out)


def test_greedy_generation_equals_uncached_greedy(greedy_reference):
  spec, params, _, _, out = greedy_reference
  N = out.shape[1]
  # Greedy without a cache: each generated token is the argmax of the full forward pass over the
  # prompt and the tokens generated before it.
  full = _full_forward(spec, params, [p + out[r].tolist() for r, p in enumerate(PROMPTS)])
  for r, prompt in enumerate(PROMPTS):
    assert full[r, len(prompt) - 1:len(prompt) - 1 + N].argmax(-1).tolist() == out[r].tolist()


def test_generation_stops_at_eos_and_stop_tokens(greedy_reference):
  spec, params, tokens, lengths, ref = greedy_reference
  N = ref.shape[1]
  # Row 0's third token as eos; a two-token stop sequence from row 1's output.
  eos, stop = int(ref[0, 2]), (int(ref[1, 3]), int(ref[1, 4]))
  fn = jax.jit(gen.make_generate_fn(spec, gen.Sampling(max_new_tokens=N), eos, 0, (stop,)))
  out, n = fn(params, tokens, lengths, jax.random.key(0))
  out, n = np.asarray(out), np.asarray(n)
  first_eos = ref[0].tolist().index(eos)
  assert n[0] == first_eos and out[0, :first_eos + 1].tolist() == ref[0, :first_eos + 1].tolist()
  assert np.all(out[0, first_eos + 1:] == 0)  # padding after the end
  ends = [t for t in range(1, N) if tuple(ref[1, t - 1:t + 1]) == stop]
  hits_eos = [t for t in range(N) if ref[1, t] == eos]
  assert n[1] == min(ends[0] - 1, hits_eos[0] if hits_eos else N)


def test_sampling_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.key(1)
  draw = lambda s: np.asarray(gen.sample_logits(logits, keys, s))
  np.testing.assert_array_equal(draw(gen.Sampling(temperature=1.0, top_k=1)), 0)
  np.testing.assert_array_equal(draw(gen.Sampling(temperature=1.0, top_p=0.4)), 0)
  assert set(draw(gen.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(gen.Sampling(temperature=1.0, top_p=0.7))) == {0, 1}  # 0.5 + 0.3 reach 0.7
  freq = np.bincount(draw(gen.Sampling(temperature=1.0)), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  cold = np.bincount(draw(gen.Sampling(temperature=0.25)), minlength=4) / 4000
  assert cold[0] > 0.85  # low temperature sharpens


class _Tok:
  bos_id, eos_id, pad_id = 1, 2, 0


def test_sharded_generation_equals_single_device():
  c, spec, params = _model(vocab_size=128)
  prompts = [list(range(3, 3 + n)) for n in (1, 5, 9, 2, 7, 3, 11, 4)]
  sampling = gen.Sampling(max_new_tokens=5)
  c.mesh.shape.update(data=1)
  single = gen.Generator(c, params, _Tok(), spec=spec,
                         mesh=sharding_lib.make_mesh(c.mesh, jax.devices()[:1]))
  c.mesh.shape.update(data=4, tensor=2)
  sharded = gen.Generator(c, params, _Tok(), spec=spec, mesh=sharding_lib.make_mesh(c.mesh))
  a = single.generate_ids(prompts, sampling, batch_size=8)
  b = sharded.generate_ids(prompts, sampling, batch_size=8)
  assert a == b
  assert all(len(x) == 5 for x in a)


def test_cut_at_stop():
  assert gen.cut_at_stop('42\n\nQuestion: next', ['\n\nQuestion:', 'xyz']) == '42'
  assert gen.cut_at_stop('no stop here', ['\n\n']) == 'no stop here'


@needs_shared
def test_a_tokenizer_without_bos_generates_scores_and_trains_without_one(tmp_path):
  """Qwen-style tokenizers define no BOS (bos_token: null): filler rows and empty prompts take
  EOS (once a TypeError), and prompts, scored contexts and training text start with the text."""
  from lm.data import formats
  from lm.data import tokenizer as tokenizer_lib
  from lm.eval import tasks
  from lm.eval.evaluate import Model
  tok = tokenizer_lib.load(make_hf_tokenizer(tmp_path / 'qwen', 'qwen'))
  assert tok.bos_id is None and not tok.add_bos
  c, spec, params = _model(vocab_size=640, max_seq_len=64)
  model = Model('qwen', c, spec, params, tok, sharding_lib.make_mesh(c.mesh, jax.devices()[:1]))
  outs = model.generator.generate(['To be', 'or not', ''], gen.Sampling(max_new_tokens=3), batch_size=4)
  assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
  assert model.generator.start_id == tok.eos_id
  ctx, cont = tasks._split_encode(tok, 'To be', ' or not')  # pylint: disable=protected-access
  assert ctx == tok.encode('To be') and ctx + cont == tok.encode('To be or not')
  (ids, _), = formats.Encoder('text', tok, 32)({'text': 'To be'})[0]
  assert ids.tolist() == tok.encode('To be') + [tok.eos_id]
