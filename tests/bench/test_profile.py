"""lm.bench.profile: the step's ops from a jax.profiler trace, named after the compiled HLO."""

import re

import jax
from conftest import tiny_config

from lm.bench import profile


def test_profile_names_the_steps_ops_and_what_they_compute(tmp_path):
  c = tiny_config()
  seconds, per_step, descriptions = profile.profile_step(c, steps=2, warmup=1,
                                                         trace_dir=str(tmp_path),
                                                         devices=jax.devices()[:1])
  assert seconds > 0
  assert len(per_step) > 10 and all(us >= 0 for us in per_step.values())
  # Every traced op is an instruction of the compiled step: the HLO describes it.
  described = [op for op in per_step if descriptions[op]]
  assert len(described) >= 0.9 * len(per_step), sorted(set(per_step) - set(described))
  # The model's matmuls are there, and the report ranks ops by time.
  assert any('dot' in d for d in descriptions.values())
  table = profile.render(seconds, per_step, descriptions, top=5).splitlines()
  assert table[0].startswith('step ') and len(table) == 2 + 5
  times = [float(line.split()[0]) for line in table[2:]]
  assert times == sorted(times, reverse=True)
  assert re.search(r'ops sum to [\d.]+ ms per step', table[0])
