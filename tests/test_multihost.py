"""Two processes with two CPU devices each, joined by jax.distributed (gloo collectives), train
like one process with four devices; their checkpoint restores in a single process."""

import socket

import jax
import numpy as np

import lm_runs
from lm import distributed
from lm.train import loop as train_lib
from lm.train.checkpoint import Checkpointer


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_and_their_checkpoint_restores_in_one(tmp_path):
  corpus = lm_runs.write_corpus(str(tmp_path / 'docs.jsonl'))
  cache = str(tmp_path / 'jax-cache')
  args = [f'--config.data.train_files={corpus}', '--config.train.steps=4',
          '--config.train.checkpoint_every=2']
  one = lm_runs.run(tmp_path / 'one', *args, cache_dir=cache, JAX_NUM_CPU_DEVICES=4)
  assert one.returncode == 0, one.stderr
  args.append(f'--config.data.tokenizer={tmp_path / "one" / "tokenizer.model"}')
  port = _free_port()
  procs = [lm_runs.start(tmp_path / 'two', *args, cache_dir=cache, JAX_NUM_CPU_DEVICES=2,
                         LM_COORDINATOR_ADDRESS=f'localhost:{port}', LM_NUM_PROCESSES=2,
                         LM_PROCESS_ID=i) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
  assert "'data': 4," in one.stdout.split('parameters on mesh', 1)[1].split('}', 1)[0]

  single, multi = lm_runs.losses(tmp_path / 'one'), lm_runs.losses(tmp_path / 'two')
  assert sorted(multi) == [1, 2, 3, 4]
  for step, loss in single.items():
    assert abs(multi[step] - loss) <= 1e-6, (step, multi[step], loss)

  cfg = lm_runs.tiny_config(*args)
  trainer = train_lib.Trainer(cfg, devices=jax.devices()[:1])
  restored = {name: Checkpointer(str(tmp_path / name)).restore(trainer.abstract_state,
                                                              trainer.shardings)[0]
              for name in ('one', 'two')}
  assert int(restored['two'].step) == 4
  for name, p in restored['two'].params.items():
    np.testing.assert_allclose(np.asarray(p), np.asarray(restored['one'].params[name]), atol=1e-6,
                               rtol=0, err_msg=name)


def test_distributed_settings_from_config_and_environment(monkeypatch):
  cfg = lm_runs.tiny_config('--config.distributed.coordinator_address=host0:1234',
                            '--config.distributed.num_processes=4')
  assert distributed.settings(lm_runs.tiny_config().distributed) is None  # one process
  monkeypatch.setenv('LM_PROCESS_ID', '3')
  assert distributed.settings(cfg.distributed) == {
      'coordinator_address': 'host0:1234', 'num_processes': 4, 'process_id': 3}
  monkeypatch.setenv('LM_COORDINATOR_ADDRESS', 'host1:99')  # the launcher's environment wins
  assert distributed.settings(cfg.distributed)['coordinator_address'] == 'host1:99'
