"""What a run survives: kills, stop signals, unreadable checkpoints, numerical faults, other meshes.

The kill and signal tests run `lm train` in real subprocesses (tests/lm_runs.py) and compare every
step's loss with an uninterrupted run: equal floats, not approximately equal ones.
"""

import os
import re
import signal
import time

import jax
import numpy as np
import optax
import pytest
from conftest import random_batch, tiny_config

import lm_runs
from lm.model import lora
from lm.train import objectives
from lm.io import pretrained
from lm.train import loop as train_lib
from lm.train.checkpoint import UNREADABLE, Checkpointer
from lm.errors import EXIT_DIVERGED, EXIT_GRACE_EXPIRED, EXIT_PREEMPTED, CheckpointError, UserError
from lm.train.metrics import read_metrics
from lm.train.step import make_train_step
from lm.train import rundir


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _assert_same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- The numerical guard -------------------------------------------------------------------------

def scaled_xent(model, batch):
  """Next-token loss times batch['scale']: a controllable loss spike."""
  loss_sum, weight_sum, aux = objectives.next_token_xent(model, batch)
  return loss_sum * batch['scale'][0], weight_sum, aux


def test_guard_skips_non_finite_and_spiking_steps():
  c = tiny_config()
  c.train.update(spike_zscore=4.0, spike_window=3)
  trainer = train_lib.Trainer(c, objective=scaled_xent, devices=jax.devices()[:1])
  state = trainer.init_state()

  def batch(kind):
    b = random_batch(c)
    b['scale'] = np.full((c.data.batch_size,), 100.0 if kind == 'spike' else 1.0, np.float32)
    if kind == 'nan':
      b['weights'][0, 0] = np.nan
    return trainer.global_batch(b)

  for kind in ['ok', 'ok', 'ok', 'nan', 'spike', 'ok']:
    before = _host((state.params, state.opt_state))  # a copy: the step donates the state
    state, m = trainer.step(state, batch(kind))
    if kind == 'ok':
      assert float(m['skipped']) == 0 and int(m['bad_streak']) == 0
    else:
      assert float(m['skipped']) == 1, kind
      _assert_same((state.params, state.opt_state), before)
  assert int(m['skipped_total']) == 2 and int(state.guard.accepted) == 4 and int(state.step) == 6


def test_guard_skips_an_update_that_makes_weights_non_finite():
  """A finite loss and gradient times an overflowing step size: the weights, not the loss, go bad."""
  c = tiny_config()
  trainer = train_lib.Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  labels = trainer.labels
  overflow = optax.multi_transform({'trainable': optax.scale(float('inf')), 'frozen': optax.set_to_zero()},
                                   labels)
  step = jax.jit(make_train_step(trainer.spec, objectives.next_token_xent, overflow,
                                 optax.constant_schedule(1.0), labels))
  state = state.replace(opt_state=overflow.init(state.params))
  before = _host(state.params)
  state, m = step(state, trainer.global_batch(random_batch(c)))
  assert np.isfinite(float(m['loss'])) and np.isfinite(float(m['grad_norm']))
  assert float(m['nonfinite_weights']) == 1 and float(m['skipped']) == 1
  _assert_same(state.params, before)
  assert 'an update that made weights non-finite' in train_lib.diverged_message(
      c, 1, {k: float(v) for k, v in m.items()}, type('NoCheckpoints', (), {'latest_step': lambda self: None})())


# --- Checkpoint content, policies, meshes --------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_state():
  trainer = train_lib.Trainer(tiny_config(), devices=jax.devices()[:1])
  return trainer, trainer.init_state()


def test_keeps_the_last_n_and_every_mth(tmp_path, tiny_state):
  trainer, state = tiny_state
  ckpt = Checkpointer(str(tmp_path), keep=2, keep_every=3, async_save=False)
  for step in range(1, 8):
    ckpt.save(step, state, {'position': step})
  ckpt.close()
  assert Checkpointer(str(tmp_path)).all_steps() == [3, 6, 7]


def test_restores_onto_a_different_mesh(tmp_path):
  c8 = tiny_config()
  c8.mesh.shape.update(data=2, fsdp=4)
  saved = train_lib.Trainer(c8).init_state()  # 8 devices
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, saved, {'position': 1})
  ckpt.wait()
  for n, shape in [(1, dict(data=1)), (4, dict(data=1, fsdp=2, tensor=2))]:
    c = tiny_config()
    c.mesh.shape.update(**shape)
    trainer = train_lib.Trainer(c, devices=jax.devices()[:n])
    restored, _ = ckpt.restore(trainer.abstract_state, trainer.shardings)
    _assert_same(restored, saved)
    for name, array in restored.params.items():
      assert array.sharding == trainer.shardings.params[name], name


def test_lora_run_saves_only_its_adapters_and_restores_on_its_base(tmp_path):
  c = tiny_config()
  c.model.lora.update(rank=4, alpha=8.0)
  c.train.trainable = 'lora'
  trainer = train_lib.Trainer(c, devices=jax.devices()[:1])
  state = trainer.init_state()
  state = state.replace(params={k: v + 0.1 if k.endswith('lora_b') else v  # adapters that act
                                for k, v in state.params.items()})
  ckpt = train_lib.make_checkpointer(c, str(tmp_path), trainer.labels)
  ckpt.save(1, state, {'position': 1})
  ckpt.wait()
  saved = ckpt.manager.item_metadata(1).state.tree['params']
  assert sorted(saved) == sorted(n for n, l in trainer.labels.items() if l == 'trainable')
  assert saved and all(lora.is_adapter(n) for n in saved) and len(saved) < len(state.params)
  restored, _ = train_lib.restore(trainer, ckpt)  # frozen parameters rebuilt from the base
  _assert_same(restored, state)

  # train.init_from and `lm export` follow the same reference to the base, then merge.
  (tmp_path / 'config.json').write_text(c.to_json_best_effort())
  merged = pretrained.load_params(str(tmp_path), trainer.spec, trainer.shardings.params)
  expected = lora.merge(state.params, c.model.lora)
  for name, value in expected.items():
    np.testing.assert_allclose(np.asarray(merged[name]), np.asarray(value), atol=1e-6, err_msg=name)

  c.train.seed = 1  # another base
  with pytest.raises(CheckpointError, match='trained on base seed=0 but this run has 1'):
    train_lib.restore(trainer, train_lib.make_checkpointer(c, str(tmp_path), trainer.labels))


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')  # Orbax's dropped reads
def test_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_state, capsys):
  trainer, state = tiny_state
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(1, state, {'position': 1})
  ckpt.save(2, state, {'position': 2})
  ckpt.close()
  ckpt_dir = tmp_path / 'checkpoints'
  lm_runs.damage_checkpoint(ckpt_dir / '2')
  (ckpt_dir / '3.orbax-checkpoint-tmp').mkdir()  # a save killed half-way
  (ckpt_dir / '3.orbax-checkpoint-tmp' / 'state').write_bytes(b'half')

  ckpt = Checkpointer(str(tmp_path), async_save=False)
  restored, data = ckpt.restore(trainer.abstract_state, trainer.shardings)
  assert data == {'position': 1}
  _assert_same(restored, state)
  warning = capsys.readouterr().err.strip().splitlines()
  assert len(warning) == 1 and warning[0].startswith('lm: warning: checkpoint step 2 is unreadable')
  assert [n.split('-')[0] for n in os.listdir(tmp_path / UNREADABLE)] == ['2']
  ckpt.save(2, state, {'position': 2})  # the step number is free again
  ckpt.close()
  assert sorted(os.listdir(ckpt_dir)) == ['1', '2']  # the half-written save was removed

  for step in ('1', '2'):
    lm_runs.damage_checkpoint(ckpt_dir / step)
  with pytest.raises(CheckpointError, match='no readable checkpoint'):
    Checkpointer(str(tmp_path)).restore(trainer.abstract_state, trainer.shardings)


# --- Real runs: kill, stop signals, divergence ---------------------------------------------------

@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """An uninterrupted 12-step run; the other runs reuse its tokenizer and compilation cache."""
  base = tmp_path_factory.mktemp('runs')
  corpus = lm_runs.write_corpus(str(base / 'docs.jsonl'))
  cache = str(base / 'jax-cache')
  out = lm_runs.run(base / 'reference', f'--config.data.train_files={corpus}', cache_dir=cache)
  assert out.returncode == 0, out.stderr
  args = [f'--config.data.train_files={corpus}',
          f'--config.data.tokenizer={base / "reference" / "tokenizer.model"}']
  return {'args': args, 'cache': cache, 'losses': lm_runs.losses(base / 'reference')}


def _resumed_step(out) -> int:
  found = re.search(r'resumed from \S+ at step (\d+)', out.stdout + out.stderr)
  return int(found.group(1)) if found else 0


@pytest.mark.parametrize('kill_at, async_checkpoint, resumed_from', [
    (6, False, (4,)),  # between checkpoints
    (8, True, (0, 4, 8)),  # while checkpoint 8 (or still 4) is being written in the background
])
def test_sigkill_then_the_same_command_resumes_with_identical_losses(
    reference, tmp_path, kill_at, async_checkpoint, resumed_from):
  workdir = tmp_path / 'run'
  args = [*reference['args'], f'--config.train.async_checkpoint={async_checkpoint}']
  killed = lm_runs.run(workdir, *args, cache_dir=reference['cache'], LM_INJECT_FAULT=f'kill@{kill_at}')
  assert killed.returncode == -signal.SIGKILL
  resumed = lm_runs.run(workdir, *args, cache_dir=reference['cache'])
  assert resumed.returncode == 0, resumed.stderr
  assert _resumed_step(resumed) in resumed_from
  assert lm_runs.losses(workdir) == reference['losses']  # every step, bit for bit
  assert all(name.isdigit() for name in os.listdir(workdir / 'checkpoints'))


def test_sigterm_writes_a_checkpoint_exits_75_and_resumes_identically(reference, tmp_path):
  workdir = tmp_path / 'run'
  stopped = lm_runs.run(workdir, *reference['args'], cache_dir=reference['cache'],
                        LM_INJECT_FAULT='term@6')
  assert stopped.returncode == EXIT_PREEMPTED, stopped.stderr
  assert lm_runs.last_line(stopped.stderr) == (
      f'lm: stopped: SIGTERM at step 7: checkpoint written to {workdir / "checkpoints"}; '
      'run the same command to resume')
  assert '7' in os.listdir(workdir / 'checkpoints')
  assert max(lm_runs.losses(workdir)) == 7  # metrics flushed up to the stop
  resumed = lm_runs.run(workdir, *reference['args'], cache_dir=reference['cache'])
  assert resumed.returncode == 0 and _resumed_step(resumed) == 7, resumed.stderr
  assert lm_runs.losses(workdir) == reference['losses']


@pytest.mark.parametrize('sig, grace, code', [(signal.SIGTERM, 120, EXIT_PREEMPTED),
                                              (signal.SIGINT, 0.001, EXIT_GRACE_EXPIRED)])
def test_a_stop_signal_from_outside_ends_the_run_within_the_grace_period(reference, tmp_path, sig,
                                                                         grace, code):
  workdir = tmp_path / 'run'
  proc = lm_runs.start(workdir, *reference['args'], '--config.train.steps=100000',
                       f'--config.train.grace_seconds={grace}', cache_dir=reference['cache'])
  lm_runs.wait_for_step(workdir, 3, proc)
  t0 = time.monotonic()
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=120)
  elapsed = time.monotonic() - t0
  print(f'{signal.Signals(sig).name} with grace {grace}s: exit {proc.returncode} '
        f'{elapsed:.2f}s after the signal')
  assert proc.returncode == code, err
  assert elapsed < grace + 30
  if code == EXIT_PREEMPTED:
    step = int(re.search(r'at step (\d+):', lm_runs.last_line(err)).group(1))
    assert str(step) in os.listdir(workdir / 'checkpoints')
    assert max(lm_runs.losses(workdir)) == step
  else:
    assert 'grace period of 0.001s ran out' in lm_runs.last_line(err)
    # Whatever was complete still restores: the same command picks up from it.
    again = lm_runs.run(workdir, *reference['args'], cache_dir=reference['cache'])
    assert again.returncode == 0, again.stderr


def test_consecutive_bad_steps_stop_the_run_with_exit_3(reference, tmp_path):
  workdir = tmp_path / 'run'
  out = lm_runs.run(workdir, *reference['args'], '--config.optimizer.lr=1e30',
                    '--config.train.max_bad_steps=3', cache_dir=reference['cache'])
  assert out.returncode == EXIT_DIVERGED, out.stderr
  line = lm_runs.last_line(out.stderr)
  assert line.startswith('lm: stopped: step 4: 3 consecutive steps were skipped, the last for a '
                         'non-finite'), line
  rows = [m for m in read_metrics(str(workdir)) if 'skipped' in m]
  assert [m['skipped'] for m in rows] == [0, 1, 1, 1] and rows[-1]['skipped_total'] == 3
  # The checkpoint holds the last accepted parameters, finite.
  cfg = lm_runs.tiny_config(*reference['args'], '--config.optimizer.lr=1e30')
  trainer = train_lib.Trainer(cfg, devices=jax.devices()[:1])
  state, _ = Checkpointer(str(workdir)).restore(trainer.abstract_state, trainer.shardings)
  assert all(np.isfinite(np.asarray(p)).all() for p in state.params.values())
  assert int(state.guard.skipped) == 3


def test_injected_nan_steps_are_skipped_and_the_run_goes_on(reference, tmp_path):
  """LM_INJECT_FAULT=nan@3,nan@4: steps 3 and 4 see NaN loss weights; the guard skips exactly
  those, later steps train on from step 2's weights, and every checkpoint is finite."""
  workdir = tmp_path / 'run'
  out = lm_runs.run(workdir, *reference['args'], '--config.train.steps=6',
                    cache_dir=reference['cache'], LM_INJECT_FAULT='nan@3,nan@4')
  assert out.returncode == 0, out.stderr
  rows = {m['step']: m for m in read_metrics(str(workdir)) if 'skipped' in m}
  assert [rows[s]['skipped'] for s in range(1, 7)] == [0, 0, 1, 1, 0, 0]
  assert np.isnan(rows[3]['loss']) and rows[6]['skipped_total'] == 2
  assert [rows[s]['loss'] for s in (1, 2)] == [reference['losses'][s] for s in (1, 2)]
  cfg = lm_runs.tiny_config(*reference['args'], '--config.train.steps=6')
  trainer = train_lib.Trainer(cfg, devices=jax.devices()[:1])
  state, _ = Checkpointer(str(workdir)).restore(trainer.abstract_state, trainer.shardings)
  assert int(state.step) == 6 and int(state.guard.skipped) == 2
  assert all(np.isfinite(np.asarray(p)).all() for p in state.params.values())


# --- One writer per run ----------------------------------------------------------------------------

def test_a_lock_left_by_a_killed_writer_is_taken_over(tmp_path, capsys):
  # What a SIGKILLed writer leaves: the record of its pid, and no flock (the kernel dropped it).
  (tmp_path / rundir.LOCK).write_text('pid 4194303 on elsewhere since 2026-01-01 00:00:00')
  with rundir.single_writer(str(tmp_path)):
    assert (tmp_path / rundir.LOCK).read_text().startswith(f'pid {os.getpid()} on ')
    with pytest.raises(UserError, match=f'being written by another lm train \\(pid {os.getpid()} on '):
      with rundir.single_writer(str(tmp_path)):  # a second writer, even from this process
        pass
  assert capsys.readouterr().err.strip() == (
      'lm: warning: took over the writer lock of pid 4194303 on elsewhere since 2026-01-01 00:00:00, '
      'which is no longer running')
  assert (tmp_path / rundir.LOCK).read_text() == ''  # released: no holder recorded
