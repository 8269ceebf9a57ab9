"""Multi-host start-up through JAX's own runtime (`jax.distributed`), from config and environment.

Every host runs the same `lm train`; `jax.distributed.initialize()` joins them. It runs when
`LM_DISTRIBUTED=1` (set by the launchers in launch/) or `distributed.enabled=True`, or when a
coordinator address is given. Without an address JAX auto-detects the cluster (SLURM, Cloud TPU,
GKE, MPI); `LM_COORDINATOR_ADDRESS`, `LM_NUM_PROCESSES` and `LM_PROCESS_ID` (or the
`distributed.*` config keys, which the environment overrides) name it explicitly, e.g. for local
processes. CPU processes exchange collectives through gloo, so a multi-process run works on one
machine without accelerators (`JAX_NUM_CPU_DEVICES=N` gives each process N CPU devices).
"""

from __future__ import annotations

import os

import jax

from lm.errors import ConfigError

ENV = {'coordinator_address': 'LM_COORDINATOR_ADDRESS', 'num_processes': 'LM_NUM_PROCESSES',
       'process_id': 'LM_PROCESS_ID'}


def settings(dist_cfg=None) -> dict | None:
  """The keyword arguments for jax.distributed.initialize, or None for a single process."""
  values = {k: (dist_cfg[k] if dist_cfg is not None else None) for k in ENV}
  for key, var in ENV.items():
    text = os.environ.get(var, '')
    if not text:
      continue
    if key == 'coordinator_address':
      values[key] = text
      continue
    try:
      values[key] = int(text)
    except ValueError:
      raise ConfigError(f'{var}={text!r} is not an integer; set it to a whole number') from None
  enabled = (os.environ.get('LM_DISTRIBUTED', '0') not in ('0', '')
             or bool(dist_cfg is not None and dist_cfg.enabled) or bool(values['coordinator_address']))
  if not enabled:
    return None
  n, i = values['num_processes'], values['process_id']
  if n is not None and n < 1:
    raise ConfigError(f'number of processes {n} must be at least 1 (LM_NUM_PROCESSES / '
                      'distributed.num_processes)')
  if n is not None and i is not None and not 0 <= i < n:
    raise ConfigError(f'process id {i} is outside 0..{n - 1} (LM_PROCESS_ID / distributed.process_id)')
  return {k: v for k, v in values.items() if v is not None}


def maybe_initialize(dist_cfg=None) -> bool:
  """Initializes jax.distributed when config or environment ask for it; returns whether it did."""
  kwargs = settings(dist_cfg)
  if kwargs is None:
    return False
  # Cross-process collectives between CPU devices (JAX's default in recent versions, not in all
  # the versions pyproject.toml allows); accelerators use their own (NCCL, ICI).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)
  return True
