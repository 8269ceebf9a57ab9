"""The benchmark harness: batches of the config's shape, lm and HF steps behind one interface,
alternating rounds, and the benchmarks built on them."""

import jax
import numpy as np
import pytest
from conftest import tiny_config

from lm.bench import finetune as bench_finetune
from lm.bench import harness
from lm.bench import train as bench_train


def test_random_batch_has_the_config_shape_and_next_token_targets():
  c = tiny_config()
  b = harness.random_batch(c, seed=1)
  B, T = c.data.batch_size, c.data.seq_len
  assert {k: v.shape for k, v in b.items()} == {k: (B, T) for k in b}
  np.testing.assert_array_equal(b['tokens'][:, 1:], b['targets'][:, :-1])
  assert b['tokens'].max() < c.model.vocab_size and b['weights'].sum() == B * T
  np.testing.assert_array_equal(b['positions'][3], np.arange(T))
  np.testing.assert_array_equal(harness.random_batch(c, seed=1)['tokens'], b['tokens'])


class _Counting:
  def __init__(self, seconds, log, name):
    self.seconds, self.log, self.name = seconds, log, name

  def steps(self, n):
    self.log.append((self.name, n))
    return self.seconds.pop(0)


def test_rounds_alternate_between_runs_and_keep_each_runs_best():
  log = []
  runs = {'a': _Counting([9.0, 3.0, 2.0, 4.0], log, 'a'), 'b': _Counting([9.0, 5.0, 6.0, 1.0], log, 'b')}
  best = harness.time_rounds(runs, steps=5, rounds=3, warmup=2)
  assert log == [('a', 2), ('b', 2)] + [('a', 5), ('b', 5)] * 3
  assert best == {'a': 2.0, 'b': 1.0}


def test_lm_step_trains_and_accounts_its_memory():
  run = harness.LmStep(tiny_config(), devices=jax.devices()[:1])
  first = run.steps(1)
  assert first > 0 and np.isfinite(run.loss)
  loss0 = run.loss
  run.steps(3)
  assert run.loss < loss0  # the same batch again: the loss goes down
  nbytes, how = run.memory()
  assert how == 'compiled step buffers'
  params = sum(int(np.prod(s.shape)) * 4 for s in run.trainer.spec.shapes.values())
  assert nbytes > 3 * params  # parameters, two Adam moments, gradients


def test_bench_train_and_finetune_print_lm_beside_hf(capsys):
  pytest.importorskip('transformers')
  pytest.importorskip('peft')
  c = tiny_config()
  c.mesh.shape.update(data=-1)  # every test device
  result = bench_train.run(c, steps=1, rounds=1)
  assert set(result) == {'lm', 'hf'} and result['lm']['tokens_per_s'] > 0
  assert 0 < result['lm']['mfu'] < 1
  out = capsys.readouterr().out
  assert 'lm / hf throughput' in out
  results = bench_finetune.run(c, steps=1, rounds=1, rank=2)
  assert set(results) == {'lm full', 'lm lora', 'hf full', 'hf+peft lora'}
  assert 'lm lora / lm full step time' in capsys.readouterr().out
  # LoRA trains fewer parameters on both sides.
  assert results['lm lora']['summary'] != results['lm full']['summary']
