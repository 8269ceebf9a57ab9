"""lm.bench.profile: the step's ops from a jax.profiler trace, named after the compiled HLO."""

import re

import jax
import pytest
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


def test_ops_are_sorted_into_kinds_of_work():
  descriptions = {
      'ynn_fusion.46': 'fusion/kCustom -> f32[2048,8192]{1,0} (fused_computation.46) [dot]',
      'dot.102': 'dot -> f32[256,8192]{1,0}',
      'copy_bitcast_fusion.4': 'fusion/kLoop -> f32[704,2048]{1,0} (fc.107) [subtract,multiply,transpose,copy]',
      'copy.220': 'copy -> f32[4,8,256,256]{3,2,1,0}',
      'wrapped_broadcast.7': 'fusion/kLoop -> f32[4,8,256,256]{3,2,1,0} (wbc.7) [broadcast]',
      'add_divide_fusion': 'fusion/kLoop -> f32[8,256,704]{2,1,0} (fc.82) [broadcast,negate,exponential,add,divide]',
  }
  per_step = dict(zip(descriptions, (60.0, 20.0, 40.0, 2.0, 14.0, 5.0)))
  assert profile.by_kind(per_step, descriptions) == {
      'matmul': 80.0, 'copy / transpose': 42.0, 'zero-fill': 14.0, 'other': 5.0}
  assert [profile.hf_kind(n) for n in ('aten::mm', 'aten::_scaled_dot_product_flash_attention_for_cpu',
                                       'aten::copy_', 'aten::mul')] == [
      'matmul', 'attention (one fused kernel)', 'copy / transpose', 'other']
  table = profile.render_kinds(0.8, {'matmul': 400e3, 'other': 100e3}, 0.5,
                               {'matmul': 350e3, 'attention (one fused kernel)': 50e3}).splitlines()
  assert table[1].split()[-2:] == ['800.0', '500.0']
  assert table[2].split()[-2:] == ['400.0', '350.0']
  assert table[-1].split()[-2:] == ['kernel)', '50.0']  # no lm figure for it


def test_the_same_step_profiled_in_transformers():
  c = tiny_config()
  seconds, kinds = profile.profile_hf(c, steps=1, warmup=1)
  assert seconds > 0 and kinds['matmul'] > 0 and sum(kinds.values()) > kinds['matmul']


def test_hf_comparison_without_torch_is_one_line(monkeypatch, capsys):
  monkeypatch.setattr(profile, 'hf_available', lambda: False)
  with pytest.raises(SystemExit) as exit_info:
    profile.main(['--config', 'configs/bench_tiny.py', '--hf'])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
      "error: --hf needs torch and transformers: pip install -e '.[test]' (torch==2.13.0, CPU)")
