"""Orbax checkpoints of the train state and the data iterator position, in `<workdir>/checkpoints`.

Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint
that exists is whole; restoring places every array directly into its target sharding.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from lm.errors import CheckpointError
from lm.state import TrainState, abstract_with_shardings


class Checkpointer:

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_state: dict, *, force: bool = False) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    data=ocp.args.JsonSave(data_state)), force=force)

  def restore(self, abstract_state: TrainState, shardings: TrainState, step: int | None = None):
    """(state, data_state) of `step` (default: latest), placed with `shardings`."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    target = abstract_with_shardings(abstract_state, shardings)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError) as e:
      raise CheckpointError(f'checkpoint step {step} in {self.directory} does not fit this model '
                            f'and optimizer ({str(e).splitlines()[0][:200]}); use a new --workdir or '
                            'the config it was trained with') from None
    return restored.state, restored.data

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
