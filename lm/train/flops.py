"""Model FLOPs per token and peak device FLOP/s, for MFU."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from lm.config import head_dim, n_experts

# Dense bf16 peak FLOP/s per chip, from vendor datasheets.
PEAK_FLOPS = {
    'H200': 989e12,
    'H100': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v6': 918e12,
    'TPU v5p': 459e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v4': 275e12,
}


def matmul_params(m) -> int:
  """Parameters that take part in a matmul per token (embedding lookups don't)."""
  D, F, H, G, K, L, V = (m.d_model, m.mlp_dim, m.n_heads, m.n_kv_heads, head_dim(m), m.n_layers,
                         m.vocab_size)
  mlp = 3 * D * F
  if n_experts(m):  # the k experts a token is routed to, and the router, take part
    mlp = 3 * D * (m.moe.expert_dim or F) * m.moe.experts_per_token + D * m.moe.n_experts
  per_layer = D * H * K * 2 + D * G * K * 2 + mlp
  return L * per_layer + D * V


def train_flops_per_token(m, seq_len: int) -> float:
  """6N for the matmuls (forward + backward) plus causal attention: 6·L·T·H·K (half of 12·L·T·H·K,
  since a causal mask skips half the scores)."""
  return 6.0 * matmul_params(m) + 6.0 * m.n_layers * seq_len * m.n_heads * head_dim(m)


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(device=None) -> float:
  """FLOP/s of a large float32 matmul on `device`: the CPU has no datasheet figure to use."""
  n = 1024
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  reps, start = 10, time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start)


def peak_flops_per_device(configured: float = 0.0) -> tuple[float, str]:
  """(FLOP/s, where the figure came from)."""
  if configured:
    return configured, 'config'
  device = jax.devices()[0]
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in device.device_kind.lower():
      return flops, f'{name} datasheet'
  return measured_matmul_flops(device), f'measured f32 matmul on {device.device_kind}'
