"""lm.bench.parts: forward, forward+backward and the whole step of one model, timed in turn."""

import jax
import pytest
from conftest import tiny_config

from lm.bench import parts as parts_lib
from lm.bench.harness import hf_available


def _check(parts, prefix):
  forward, backward = parts[f'{prefix} fwd'](), parts[f'{prefix} fwd+bwd']()
  assert forward == pytest.approx(backward, rel=1e-5)  # the same loss, with and without its gradient
  first = parts[f'{prefix} step']()
  assert first == pytest.approx(forward, rel=1e-4)  # the step reports the loss before its update
  assert parts[f'{prefix} step']() < first  # which lowers it on the same batch


def test_parts_are_the_same_loss_and_are_timed_in_turn():
  c = tiny_config()
  parts = parts_lib.lm_parts(c, devices=jax.devices()[:1])
  _check(parts, 'lm')
  times = parts_lib.time_parts(parts, rounds=2, steps=1)
  assert list(times) == ['lm fwd', 'lm fwd+bwd', 'lm step']
  assert all(len(t) == 2 and min(t) > 0 for t in times.values())
  rows = parts_lib.render(times).splitlines()
  assert [r.split()[0] for r in rows] == ['lm', 'lm', 'lm'] and all(' ms  (best ' in r for r in rows)


@pytest.mark.skipif(not hf_available(), reason='transformers and torch are the [test] extra')
def test_transformers_parts_are_the_same_loss():
  _check(parts_lib.hf_parts(tiny_config()), 'hf')
