import math

import jax
import numpy as np
import pytest
from conftest import tiny_config

from lm.eval import scoring
from lm import sharding as sharding_lib
from lm.eval import text_metrics as tm
from lm.train.metrics import perplexity, plot_loss_curves, read_metrics
from lm.train.state import ModelSpec


def test_extract_answer():
  assert tm.extract_answer('She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 1,234') == '1234'
  assert tm.extract_answer('#### $5.50 per hour') == '5.5'
  assert tm.extract_answer('#### -7') == '-7'
  assert tm.extract_answer('2 + 3 = 5, so the answer is 42.') == '42'  # no marker: last number
  assert tm.extract_answer('3.0') == '3'
  assert tm.extract_answer('no digits at all') == ''
  assert tm.extract_answer('#### 1' + '0' * 40) == '1' + '0' * 40  # exact, not via float
  assert tm.normalize_number('0.10') == '0.1' and tm.normalize_number('nan') == 'nan'


def test_exact_match_normalises_case_punctuation_and_articles():
  # Numbers compare by value: 42 and 42.0 match; 1.8 and 18, -18 and 18 do not.
  assert tm.exact_match(['The Cat!', ' dog ', '42'], ['cat', 'Dog', '42.0']) == pytest.approx(100.0)
  assert tm.exact_match(['1.8', '-18'], ['18', '18']) == 0.0
  assert tm.exact_match([], []) == 0.0
  with pytest.raises(ValueError):
    tm.exact_match(['a'], [])


def test_token_f1_by_hand():
  # {cat, sat} against {cat, sat, down}: precision 1, recall 2/3, F1 0.8.
  assert tm.token_f1(['the cat sat'], ['cat sat down']) == pytest.approx(80.0)
  assert tm.token_f1(['cat sat', 'x'], ['cat sat', 'y']) == pytest.approx(50.0)


def test_rouge_l_by_hand():
  # LCS of (the cat sat on the mat) and (the cat was on the mat) is 5 of 6 words each way.
  assert tm.rouge_l(['the cat sat on the mat'], ['the cat was on the mat']) == pytest.approx(500 / 6)
  assert tm.rouge_l(['a b c'], ['a b c']) == pytest.approx(100.0)


def test_bleu_by_hand():
  # Same length (no brevity penalty); n-gram precisions 4/5, 3/4, 2/3, 1/2.
  expected = 100 * (0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25
  assert tm.bleu(['the quick brown fox jumps'], ['the quick brown fox jumped']) == pytest.approx(
      expected, abs=0.01)
  assert tm.bleu(['the cat sat on the mat'], ['the cat sat on the mat']) == pytest.approx(100.0)


@pytest.fixture(scope='module')
def model():
  c = tiny_config()
  spec = ModelSpec(c.model)
  return c, spec, jax.jit(spec.init)(jax.random.key(0))


def _scorer(c, params, spec, **mesh):
  c.mesh.shape.update(mesh)
  n = int(np.prod(list(mesh.values())))
  return scoring.Scorer(c, params, spec=spec,
                        mesh=sharding_lib.make_mesh(c.mesh, jax.devices()[:n]))


def test_uniform_model_scores_by_hand(model):
  """With a zero output layer every token has probability 1/V: an option of n tokens scores
  -n log V, the shortest option wins by summed log-probability, and perplexity is V."""
  c, spec, params = model
  params = {**params, 'lm_head.kernel': np.zeros_like(params['lm_head.kernel'])}
  s = _scorer(c, params, spec, data=1)
  V = c.model.vocab_size
  scores = s.score([([1, 5], [7]), ([1], [7, 8, 9])])
  assert scores[0][:2] == (pytest.approx(-math.log(V), rel=1e-5), 1)
  assert scores[1][:2] == (pytest.approx(-3 * math.log(V), rel=1e-5), 3)
  mc = s.multiple_choice([([1, 4], [[5, 6, 7], [8], [9, 10]], 1)])
  assert mc['accuracy'] == 100.0 and mc['chance'] == pytest.approx(100 / 3)
  assert s.perplexity([[1, 5, 6, 7, 8] * 10])['perplexity'] == pytest.approx(V, rel=1e-4)


def test_multiple_choice_picks_the_option_with_higher_summed_logprob(model):
  c, spec, params = model
  s = _scorer(c, params, spec, data=1)
  rng = np.random.default_rng(0)
  items = [(rng.integers(3, 128, 5).tolist(), [rng.integers(3, 128, n).tolist() for n in (1, 3, 2)])
           for _ in range(6)]
  # Independent computation: log-softmax of one unpadded forward pass per option.
  forward = jax.jit(lambda p, x: jax.nn.log_softmax(spec.bind(p)(x)))
  best = []
  for ctx, options in items:
    sums = []
    for opt in options:
      ids = np.asarray([ctx + opt])
      logp = np.asarray(forward(params, ids))[0]
      sums.append(sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(opt)))
    best.append(int(np.argmax(sums)))
    got = [x[0] for x in s.score([(ctx, o) for o in options])]
    np.testing.assert_allclose(got, sums, rtol=1e-5)
  assert s.multiple_choice([(c_, o, b) for (c_, o), b in zip(items, best)])['accuracy'] == 100.0
  wrong = [(c_, o, (b + 1) % 3) for (c_, o), b in zip(items, best)]
  assert s.multiple_choice(wrong)['accuracy'] == 0.0


def test_sharded_scores_equal_single_device(model):
  c, spec, params = model
  rng = np.random.default_rng(1)
  requests = [(rng.integers(3, 128, n).tolist(), rng.integers(3, 128, 3).tolist())
              for n in (2, 9, 4, 30, 1, 7, 5, 12, 3)]
  single = _scorer(c, params, spec, data=1).score(requests, batch_size=8)
  sharded = _scorer(c, params, spec, data=4, tensor=2).score(requests, batch_size=8)
  np.testing.assert_allclose([x[0] for x in single], [x[0] for x in sharded], rtol=1e-5)
  assert [x[1:] for x in single] == [x[1:] for x in sharded]


def test_read_metrics_skips_torn_lines_and_a_missing_file_is_empty(tmp_path):
  assert read_metrics(str(tmp_path)) == []
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "loss": 2.5}\n[1, 2]\n{"step": 2, "lo')
  assert read_metrics(str(tmp_path)) == [{'step': 1, 'loss': 2.5}]


def test_perplexity_is_capped_for_diverged_runs():
  assert perplexity(math.log(7.0)) == pytest.approx(7.0)
  assert perplexity(1e6) == math.exp(50.0)


def test_loss_curves_plot_both_panels(tmp_path):
  records = {'a': [{'step': 1, 'loss': 3.0}, {'step': 2, 'loss': 2.0, 'eval_loss': 2.5}],
             'b': [{'step': 1, 'loss': float('nan')}]}
  path = plot_loss_curves(records, str(tmp_path / 'curves.png'), title='t')
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
