"""MFU's denominator: the datasheet table by device kind, and the CPU figure cached per machine."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from lm.train import flops


@pytest.mark.parametrize('kind, expected', [
    ('TPU v4', 275e12),
    ('TPU v5 lite', 197e12),  # v5e
    ('TPU v5', 459e12),  # v5p reads 'TPU v5'
    ('TPU v5p', 459e12),
    ('TPU v6 lite', 918e12),  # v6e
    ('NVIDIA H100 80GB HBM3', 989e12),
    ('NVIDIA H100 PCIe', 756e12),
    ('NVIDIA H200', 989e12),
    ('NVIDIA B200', 2250e12),
    ('NVIDIA L4', 121e12),
])
def test_datasheet_table(kind, expected):
  assert flops.datasheet_peak(kind)[0] == expected


@pytest.mark.parametrize('kind', ['cpu', 'TPU v7x', 'NVIDIA L40S', 'NVIDIA GeForce RTX 4090'])
def test_unknown_kinds_are_not_guessed(kind):
  assert flops.datasheet_peak(kind) is None


def test_cpu_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(flops, 'measured_matmul_flops', lambda device: calls.append(device) or 1.5e11)
  path = str(tmp_path / 'lm' / 'cpu_peak.json')
  peak, source = flops.cpu_peak_flops.__wrapped__(path)
  assert peak == 1.5e11 and path in source and len(calls) == 1
  with open(path, encoding='utf-8') as f:
    table = json.load(f)
  assert table[flops.cpu_name()]['flops'] == 1.5e11
  # A later run (another process: no lru_cache) reads the figure instead of timing again.
  assert flops.cpu_peak_flops.__wrapped__(path)[0] == 1.5e11 and len(calls) == 1
  # Other machines' entries are kept, and a damaged entry is measured again.
  table = {'Other CPU x 64': {'flops': 9e12, 'measured': 'then'}, flops.cpu_name(): {'flops': 'x'}}
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(table, f)
  assert flops.cpu_peak_flops.__wrapped__(path)[0] == 1.5e11 and len(calls) == 2
  with open(path, encoding='utf-8') as f:
    assert json.load(f)['Other CPU x 64']['flops'] == 9e12


def test_configured_peak_wins():
  assert flops.peak_flops_per_device(123e12) == (123e12, 'config')


@pytest.mark.parametrize('K, V', [(64, 64), (64, 128)])
def test_gated_delta_flops_are_what_xla_counts_in_the_chunked_form(K, V):
  """One chunk (XLA's cost analysis counts a loop body once) of the jnp chunked form: XLA's count
  is the formula less the triangular solves, which it counts as nothing, plus a few elementwise
  FLOPs (decays, gates) per token."""
  from lm.model.kernels import gated_delta  # pylint: disable=import-outside-toplevel
  C, H = 64, 2
  q, k = jnp.ones((1, C, 1, K)), jnp.ones((1, C, 1, K))
  v, g, beta = jnp.ones((1, C, H, V)), -jnp.ones((1, C, H)), jnp.ones((1, C, H)) / 2
  counted = jax.jit(lambda *a: gated_delta.chunk_gated_delta_rule(*a)[0]).lower(
      q, k, v, g, beta).cost_analysis()['flops'] / (C * H)
  m = ml_collections.ConfigDict(dict(linear_attn=dict(n_value_heads=1, key_head_dim=K,
                                                        value_head_dim=V)))
  solves = C * (K + V)
  assert counted == pytest.approx(flops.gated_delta_flops_per_token(m) - solves, rel=0.05)
