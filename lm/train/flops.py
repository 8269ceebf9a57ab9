"""Model FLOPs per token and peak device FLOP/s, for MFU."""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import time

import jax
import jax.numpy as jnp

from lm.config import head_dim, mla_enabled, n_experts

# Dense (no sparsity) bf16 peak FLOP/s per chip, from the vendors' datasheets, by the
# `device_kind` JAX reports. TPU kinds are matched whole: v5p reads 'TPU v5' and v5e 'TPU v5 lite'.
TPU_PEAK_FLOPS = {
    'tpu v4': 275e12,
    'tpu v5 lite': 197e12,  # v5e
    'tpu v5e': 197e12,
    'tpu v5': 459e12,  # v5p
    'tpu v5p': 459e12,
    'tpu v6 lite': 918e12,  # v6e (Trillium)
    'tpu v6e': 918e12,
}
# GPU kinds read like 'NVIDIA H100 80GB HBM3': matched by model name, first match wins (PCIe
# before the SXM figure the bare name gets).
GPU_PEAK_FLOPS = (
    ('B200', 2250e12),
    ('H200', 989e12),
    ('H100 PCIe', 756e12),
    ('H100', 989e12),
    ('A100', 312e12),
    ('L4', 121e12),
)

# On CPU there is no datasheet figure: one float32 matmul measurement per machine, kept here.
CPU_PEAK_CACHE = os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
                              'lm', 'cpu_peak.json')


def matmul_params(m) -> int:
  """Parameters that take part in a matmul per token (embedding lookups don't)."""
  D, F, H, G, K, L, V = (m.d_model, m.mlp_dim, m.n_heads, m.n_kv_heads, head_dim(m), m.n_layers,
                         m.vocab_size)
  mlp = 3 * D * F
  if n_experts(m):  # the k experts a token is routed to, and the router, take part
    mlp = 3 * D * (m.moe.expert_dim or F) * m.moe.experts_per_token + D * m.moe.n_experts
  per_layer = D * H * K * 2 + D * G * K * 2 + mlp
  if mla_enabled(m):
    per_layer = mla_matmul_params(m) + mlp
  return L * per_layer + D * V


def mla_matmul_params(m) -> int:
  """One MLA layer's projections (lm/model/mixers/mla.py): q (low-rank or direct), kv_a, kv_b, o."""
  D, H, a = m.d_model, m.n_heads, m.mla
  Q = a.qk_nope_head_dim + a.qk_rope_head_dim
  q = D * a.q_lora_rank + a.q_lora_rank * H * Q if a.q_lora_rank else D * H * Q
  return (q + D * (a.kv_lora_rank + a.qk_rope_head_dim)
          + a.kv_lora_rank * H * (a.qk_nope_head_dim + a.v_head_dim) + H * a.v_head_dim * D)


def attention_head_dims(m) -> tuple[int, int]:
  """(query/key, value) head dims of the attention scores and their weighted sum."""
  if mla_enabled(m):
    return m.mla.qk_nope_head_dim + m.mla.qk_rope_head_dim, m.mla.v_head_dim
  return head_dim(m), head_dim(m)


def train_flops_per_token(m, seq_len: int) -> float:
  """6N for the matmuls (forward + backward) plus causal attention: 3·L·T·H·(Kqk + Kv) (half of
  6·L·T·H·(Kqk + Kv), since a causal mask skips half the scores; 6·L·T·H·K when both are K)."""
  qk, v = attention_head_dims(m)
  return 6.0 * matmul_params(m) + 3.0 * m.n_layers * seq_len * m.n_heads * (qk + v)


def datasheet_peak(device_kind: str) -> tuple[float, str] | None:
  """(FLOP/s, table entry) for a known accelerator kind, else None."""
  kind = ' '.join(device_kind.lower().split())
  if kind in TPU_PEAK_FLOPS:
    return TPU_PEAK_FLOPS[kind], kind.replace('tpu', 'TPU')
  for name, flops in GPU_PEAK_FLOPS:
    if re.search(rf'\b{name.lower()}\b', kind):
      return flops, name
  return None


def measured_matmul_flops(device=None, n: int = 1024, reps: int = 5, trials: int = 3) -> float:
  """FLOP/s of a float32 [n, n] matmul on `device`: the best of `trials` timings, since load from
  other processes only ever slows a trial down."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float('inf')
  for _ in range(trials):
    start = time.perf_counter()
    for _ in range(reps):
      out = f(a)
    out.block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 * reps / best


def cpu_name() -> str:
  """'<CPU model> x <cores>': the key of this machine's cached CPU peak."""
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{model} x {os.cpu_count()}'


@functools.lru_cache(maxsize=None)
def cpu_peak_flops(cache_path: str = CPU_PEAK_CACHE) -> tuple[float, str]:
  """(FLOP/s, source) of this CPU: measured once per machine and kept in `cache_path`, so MFU
  does not move with whatever load the run's start-up meets. Delete the entry (or the file) on
  an idle machine to measure again."""
  key = cpu_name()
  try:
    with open(cache_path, encoding='utf-8') as f:
      table = json.load(f)
  except (OSError, ValueError):
    table = {}
  entry = table.get(key)
  if not isinstance(entry, dict) or not isinstance(entry.get('flops'), (int, float)):
    entry = {'flops': measured_matmul_flops(jax.devices('cpu')[0]),
             'measured': time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()),
             'how': 'best of 3 x 5 float32 1024x1024 matmuls (lm.train.flops.measured_matmul_flops)'}
    table[key] = entry
    try:  # written whole, then renamed, so a concurrent reader never sees half a file
      os.makedirs(os.path.dirname(cache_path), exist_ok=True)
      tmp = f'{cache_path}.{os.getpid()}.tmp'
      with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(table, f, indent=1)
      os.replace(tmp, cache_path)
    except OSError:
      pass  # a read-only home still gets the figure, measured again next run
  return float(entry['flops']), f'f32 matmul measured {entry["measured"]}, cached in {cache_path}'


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the figure came from): the config's figure, else the datasheet table, else
  on CPU this machine's cached measurement."""
  if configured:
    return configured, 'config'
  device = jax.devices()[0]
  known = datasheet_peak(device.device_kind)
  if known:
    return known[0], f'{known[1]} datasheet, bf16 dense'
  if device.platform == 'cpu':
    return cpu_peak_flops()
  return (measured_matmul_flops(device),
          f'f32 matmul measured now on {device.device_kind} (not in lm/train/flops.py\'s table; '
          'set metrics.peak_flops_per_device)')
