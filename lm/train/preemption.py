"""Stopping cleanly on SIGTERM or SIGINT, and injecting faults to test that recovery works.

Schedulers announce preemption with SIGTERM (SLURM, Kubernetes, Cloud TPU maintenance) and follow
with SIGKILL after a grace period. On the first SIGTERM or SIGINT the training loop finishes the
step in flight, writes a checkpoint, flushes metrics and exits with EXIT_PREEMPTED (75). If that
takes longer than `train.grace_seconds`, a watchdog exits with EXIT_GRACE_EXPIRED (76); the
previous checkpoint is untouched because a checkpoint only appears once it is complete. A second
Ctrl-C abandons the checkpoint at once.

With several processes, every process must checkpoint at the same step, so `should_stop` agrees
across processes (one small all-gather per step): a signal that reached any process stops all.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from lm.errors import EXIT_GRACE_EXPIRED, UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
  """Context manager: while active, SIGTERM/SIGINT request a stop instead of killing the process."""

  def __init__(self, grace_seconds: float):
    self.grace_seconds = grace_seconds
    self.signum: int | None = None
    self.received_at: float | None = None
    self._previous = {}
    self._timer: threading.Timer | None = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
      for s in SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    if self._timer is not None:
      self._timer.cancel()
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
    return False

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      if signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C: give up on the checkpoint
      return
    self.signum, self.received_at = signum, time.monotonic()
    self._timer = threading.Timer(self.grace_seconds, self._expire)
    self._timer.daemon = True
    self._timer.start()
    print(f'lm: {signal.Signals(signum).name} received: finishing the current step and writing a '
          f'checkpoint (grace period {self.grace_seconds:g}s)', file=sys.stderr, flush=True)

  def _expire(self):
    print(f'lm: preempted: the grace period of {self.grace_seconds:g}s ran out before the checkpoint '
          'was complete; complete checkpoints are intact; rerun the same command to resume from the latest',
          file=sys.stderr, flush=True)
    os._exit(EXIT_GRACE_EXPIRED)  # pylint: disable=protected-access

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else ''

  def should_stop(self) -> bool:
    """Whether any process received a stop signal; the same answer on every process."""
    local = self.signum is not None
    if jax.process_count() == 1:
      return local
    return bool(np.any(multihost_utils.process_allgather(np.int32(local))))


FAULT_SIGNALS = {'kill': signal.SIGKILL, 'term': signal.SIGTERM, 'int': signal.SIGINT}


def _injected(actions) -> dict[int, str]:
  """{step: action} from `LM_INJECT_FAULT=ACTION@STEP[,ACTION@STEP...]`, for `actions` only."""
  out = {}
  for part in filter(None, os.environ.get('LM_INJECT_FAULT', '').split(',')):
    action, _, at = part.partition('@')
    if action not in (*FAULT_SIGNALS, 'nan') or not at.isdigit():
      raise UserError(f'LM_INJECT_FAULT={part!r}; use ACTION@STEP with ACTION one of kill, term, '
                      'int, nan and STEP a number, comma-separated for several')
    if action in actions:
      out[int(at)] = action
  return out


def injected_fault():
  """`LM_INJECT_FAULT=ACTION@STEP` makes the run hurt itself after dispatching step STEP (and
  after that step's checkpoint, if any, was started): `kill` (SIGKILL: no clean-up at all),
  `term` (SIGTERM) or `int` (SIGINT). For recovery tests and drills; unset, it does nothing."""
  faults = _injected(FAULT_SIGNALS)

  def fault(step: int) -> None:
    if step in faults:
      os.kill(os.getpid(), FAULT_SIGNALS[faults[step]])

  return fault


def injected_numbers():
  """`LM_INJECT_FAULT=nan@STEP` (several: `nan@3,nan@4`) makes step STEP (counted from 1, as the
  logs count) see NaN loss weights, so its loss and gradient are NaN: the numerical guard's
  behaviour, tested deterministically. Returns fn(step, local_batch) -> local_batch."""
  steps = set(_injected(('nan',)))

  def poison(step: int, batch: dict) -> dict:
    if step not in steps:
      return batch
    return {k: np.full_like(v, np.nan) if k.endswith('weights') else v for k, v in batch.items()}

  return poison
