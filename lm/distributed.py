"""Multi-host start-up through JAX's own runtime (`jax.distributed`), from the environment.

`LM_DISTRIBUTED=1` (set by the launchers in launch/) calls `jax.distributed.initialize()`, which
auto-detects TPU pods and SLURM; `LM_COORDINATOR_ADDRESS`, `LM_NUM_PROCESSES` and `LM_PROCESS_ID`
override the detection (e.g. two local processes in tests).
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> bool:
  """Initializes jax.distributed when the environment asks for it; returns whether it did."""
  address = os.environ.get('LM_COORDINATOR_ADDRESS')
  if os.environ.get('LM_DISTRIBUTED', '0') in ('0', '') and not address:
    return False
  kwargs = {}
  if address:
    kwargs['coordinator_address'] = address
  if 'LM_NUM_PROCESSES' in os.environ:
    kwargs['num_processes'] = int(os.environ['LM_NUM_PROCESSES'])
  if 'LM_PROCESS_ID' in os.environ:
    kwargs['process_id'] = int(os.environ['LM_PROCESS_ID'])
  jax.distributed.initialize(**kwargs)
  return True
