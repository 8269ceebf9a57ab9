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
  """Parameters that take part in a matmul per token (embedding lookups don't), layer by layer:
  each layer's token mixer (attention or MLA, or gated DeltaNet for `layer_types` 'linear') and
  channel mixer (a dense MLP, or the k experts a token is routed to, the router and the shared
  expert with its gate: Gemma 4's dense MLP beside its experts is one)."""
  D, F, H, G, K, L, V = (m.d_model, m.mlp_dim, m.n_heads, m.n_kv_heads, head_dim(m), m.n_layers,
                         m.vocab_size)
  # q, o (and the output gate); k, v
  mixer = {'attention': mla_matmul_params(m) if mla_enabled(m) else
           D * H * K * (3 if m.attn_output_gate else 2) + D * G * K * 2}
  if 'linear' in tuple(m.layer_types):
    la = m.linear_attn  # q, k [D, G, K]; v, z [D, H, V]; b, a [D, H]; o [H, V, D]
    mixer['linear'] = D * (2 * la.n_key_heads * la.key_head_dim + 3 * la.n_value_heads
                           * la.value_head_dim + 2 * la.n_value_heads)
  mlp = {'dense': 3 * D * F}
  if n_experts(m):
    moe = m.moe
    shared = moe.get('shared_dim', 0)
    mlp['moe'] = (3 * D * (moe.expert_dim or F) * moe.experts_per_token + D * moe.n_experts
                  + 3 * D * shared + (D if shared and moe.get('shared_gate') else 0))
  mixers = ['linear' if t == 'linear' else 'attention' for t in tuple(m.layer_types) or [''] * L]
  mlps = tuple(m.mlp_types) or ('moe' if n_experts(m) else 'dense',) * L
  return sum(mixer[a] + mlp[b] for a, b in zip(mixers, mlps)) + D * V


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


def keys_per_query(T: int, window: int = 0, chunk: int = 0) -> float:
  """Keys a causal query sees on average over T positions: (T+1)/2, about w in a window of w, and
  within chunks of c positions ((c+1)/2 per whole chunk)."""
  if chunk and chunk < T:
    whole, rest = divmod(T, chunk)
    return (whole * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2) / T
  if window and window < T:
    return window - window * (window - 1) / (2 * T)
  return (T + 1) / 2


def gated_delta_flops_per_token(m, chunk_size: int = 64) -> float:
  """Forward FLOPs per token of one gated DeltaNet layer's delta rule, as its chunked form
  (lm/model/kernels/gated_delta.py) computes it, per value head: k·kᵀ and q·kᵀ within the chunk
  (2·C·K each), the unit-triangular solves for v and the decayed k (C·V + C·K), the reads of the
  carried state by k and q and its update (2·K·V each), and the intra-chunk attention times the
  new values (2·C·V): 5·C·K + 3·C·V + 6·K·V. Linear in T; the C×C blocks count whole, as run."""
  la, C = m.linear_attn, chunk_size
  K, V = la.key_head_dim, la.value_head_dim
  return la.n_value_heads * (5 * C * K + 3 * C * V + 6 * K * V)


def token_mixer_flops(m, seq_len: int) -> list[float]:
  """Per layer, forward FLOPs per token of its token mixer beyond its weights' matmuls: causal
  attention's scores and weighted values, 2·H·(Kqk + Kv) per key seen (`keys_per_query`, by the
  layer's mask: full, sliding window or chunks), or gated DeltaNet's delta rule. The backward
  is twice that."""
  qk, v = attention_head_dims(m)
  out = []
  for t in tuple(m.layer_types) or ('sliding',) * m.n_layers:
    if t == 'linear':
      out.append(gated_delta_flops_per_token(m))
    else:
      out.append(2 * m.n_heads * (qk + v) * keys_per_query(
          seq_len, m.sliding_window if t == 'sliding' else 0,
          m.attention_chunk_size if t == 'chunked' else 0))
  return out


def train_flops_per_token(m, seq_len: int) -> float:
  """6N for the matmuls (forward + backward) plus three times the token mixers' forward
  (`token_mixer_flops`; for causal attention about 3·L·T·H·(Kqk + Kv), half of what the whole
  scores would cost)."""
  return 6.0 * matmul_params(m) + 3.0 * sum(token_mixer_flops(m, seq_len))


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
