"""The catalogue of bad inputs (docs/bad_inputs.md): each gives one line saying what is wrong and
what to do, exits non-zero and leaves no partial output behind.

Cases run through `lm.cli.main` in this process (8 CPU devices), the same code `python -m lm`
runs; `test_the_real_command_exits_2` checks the process exit code itself.
"""

import os
import re
import subprocess

import jax
import pytest
from conftest import ROOT

import lm_runs
from lm import cli
from lm.io import hf
from lm.train import loop as train_lib
from lm.train.checkpoint import UNREADABLE
from lm.data import pipeline

# id -> (extra argv or a full argv starting with 'lm', expected fragment of the one-line message).
# {run} is the run directory, {d} a folder of prepared files, {tok} a 512-piece tokenizer.
CASES = {
    # Config: keys, types, values, combinations.
    'config-unknown-key': (['--config.optimizer.lrr=1'], "unknown config key 'optimizer.lrr'; did you mean 'lr'?"),
    'config-unknown-section': (['--config.optimiser.lr=1'], "did you mean 'optimizer'?"),
    'config-wrong-type': (['--config.train.steps=ten'], "--config.train.steps='ten' is not a valid int"),
    'config-wrong-bool': (['--config.model.scan_layers=maybe'], 'is not a valid bool'),
    'config-not-positive': (['--config.train.steps=0'], 'train.steps=0 must be at least 1'),
    'config-negative': (['--config.train.keep_every=-1'], 'train.keep_every=-1 must not be negative'),
    'config-impossible-mesh': (['--config.mesh.shape.data=3'], 'needs 3 devices but 8 are present'),
    'config-two-fill-axes': (['--config.mesh.shape.fsdp=-1'], 'at most one axis may be -1'),
    'config-batch-vs-data-parallel': (['--config.data.batch_size=12'],
                                      'not divisible by the 8-way data parallelism'),
    'config-seq-longer-than-positions': (['--config.data.seq_len=64'],
                                         'data.seq_len=64 exceeds model.max_seq_len=32'),
    'config-heads-vs-kv-heads': (['--config.model.n_kv_heads=3'], 'must be a multiple of model.n_kv_heads=3'),
    'config-d-model-vs-heads': (['--config.model.d_model=33'], 'model.d_model=33 is not divisible by model.n_heads=2'),
    'config-microbatches': (['--config.train.microbatches=3'], 'not divisible by train.microbatches=3'),
    'config-remat': (['--config.model.remat=some'], 'choose none, full, dots or dots_no_batch'),
    'config-moe-top-k': (['--config.model.moe.n_experts=4', '--config.model.moe.experts_per_token=5'],
                         'need n_experts >= 0 and 1 <= experts_per_token <= n_experts'),
    'config-optimizer': (['--config.optimizer.name=adamx'], "optimizer.name='adamx'; choose"),
    'config-schedule': (['--config.optimizer.schedule=cosin'], "optimizer.schedule='cosin'; choose"),
    'config-unknown-partition': (['--config.train.trainable=most'], "train.trainable='most' is not a known partition"),
    'config-empty-partition': (['--config.train.trainable=regex:nothing'], 'selects no parameters'),
    'config-file-missing': (['--config', '{d}/missing.py'], 'missing.py\' not found'),
    'config-file-no-get-config': (['--config', '{d}/no_get_config.py'], 'defines no get_config'),
    'config-file-syntax-error': (['--config', '{d}/syntax_error.py'], 'failed to load: SyntaxError (line 2)'),
    'config-file-raises': (['--config', '{d}/raises.py:big'], "failed to load: ValueError: no variant 'big'"),
    # Data, through `lm train`.
    'data-missing-file': (['--config.data.train_files=/nonexistent/docs.jsonl'], "'/nonexistent/docs.jsonl' not found"),
    'data-glob-matches-nothing': (['--config.data.train_files={d}/*.nothing'], 'not found'),
    'data-empty-file': (['--config.data.train_files={d}/empty.txt'], 'empty.txt: no usable records'),
    'data-malformed-jsonl': (['--config.data.train_files={d}/malformed.jsonl'], 'malformed.jsonl:2: malformed JSON'),
    'data-missing-field': (['--config.data.train_files={d}/body.jsonl'], "body.jsonl:1: no string field 'text'"),
    'data-record-not-an-object': (['--config.data.train_files={d}/list.jsonl'],
                                  'list.jsonl:1: expected a JSON object, got list'),
    'data-json-not-a-list': (['--config.data.train_files={d}/object.json'], 'expected a JSON list'),
    'data-malformed-json': (['--config.data.train_files={d}/broken.json'], 'broken.json:1: malformed JSON'),
    'data-not-utf8': (['--config.data.train_files={d}/latin1.txt'], 'is not valid UTF-8'),
    'data-too-few-documents': (['--config.data.train_files={d}/one_doc.txt'], 'too few to hold out'),
    'data-unknown-builtin': (['--config.data.train_files=builtin:nope'], "unknown built-in corpus 'builtin:nope'"),
    # Tokenizer and model vocabulary.
    'tokenizer-missing': (['--config.data.tokenizer=/nonexistent/sp.model'], "'/nonexistent/sp.model' not found"),
    'tokenizer-not-sentencepiece': (['--config.data.tokenizer={d}/empty.txt'], 'is not a SentencePiece model'),
    'tokenizer-vocab-exceeds-model': (['--config.model.vocab_size=256'],
                                      'tokenizer has 512 tokens but model.vocab_size=256'),
    # Checkpoints already in the run directory.
    'checkpoint-wrong-model-shape': (['--config.model.mlp_dim=96'], 'does not fit this model and optimizer'),
    'checkpoint-wrong-optimizer': (['--config.optimizer.name=sgd'], 'does not fit this model and optimizer'),
    'checkpoint-all-unreadable': ([], 'no readable checkpoint'),
    'checkpoint-partial-other-base': (['--config.train.trainable=regex:attn', '--config.train.seed=1'],
                                      'trained on base seed=0 but this run has 1'),
    'checkpoint-partial-as-full': ([], 'holds only the trained parameters of a partial run'),
    'checkpoint-lora-rank-mismatch': (['--config.train.trainable=lora', '--config.model.lora.rank=8'],
                                      'model.lora (rank, targets) differs from the run that wrote it'),
    # Starting weights (train.init_from) and exports.
    'init-from-missing': (['--config.train.init_from=/nonexistent/run'],
                          "train.init_from='/nonexistent/run' does not exist"),
    'init-from-neither': (['--config.train.init_from={d}'], 'is neither an lm run directory'),
    'hf-tensors-missing': (['--config.train.init_from={d}/hf'], "tensor 'model.norm.weight' is missing"),
    'export-not-a-run': (['lm', 'export', '--workdir', '{d}', '--out', '{run}'],
                         'is neither an lm run directory'),
    # Run directory.
    'workdir-is-a-file': (['--workdir', '{d}/empty.txt'], 'exists and is not a directory'),
    'workdir-not-writable': (['--workdir', '{d}/empty.txt/run'], 'cannot write to --workdir'),
    'workdir-url': (['--workdir', 'gs://lm-test-bucket/run'], 'is a URL'),
    # Command line.
    'cli-unknown-command': (['lm', 'frobnicate'], "unknown command 'frobnicate'"),
    'cli-missing-workdir': (['lm', 'train', '--config', 'configs/quickstart.py'],
                            'the following arguments are required: --workdir'),
    'cli-missing-config': (['lm', 'train', '--workdir', '{run}'], 'the following arguments are required: --config'),
    'cli-unknown-flag': (['--stepz', '3'], "unexpected argument '--stepz'"),
    'cli-override-without-value': (['--config.train.steps'], '--config.train.steps needs a value'),
    'cli-unknown-benchmark': (['lm', 'bench', 'nonsense'], "unknown benchmark 'nonsense'"),
    'cli-invalid-choice': (['lm', 'data', 'nonsense'], "invalid choice: 'nonsense' (choose from 'show')"),
    'cli-generate-without-run': (['lm', 'generate'], 'the following arguments are required: run'),
    # Multi-host environment.
    'env-num-processes-not-a-number': ([], "LM_NUM_PROCESSES='two' is not an integer"),
    'env-process-id-out-of-range': ([], 'process id 2 is outside 0..1'),
}

ENV = {
    'env-num-processes-not-a-number': {'LM_DISTRIBUTED': '1', 'LM_NUM_PROCESSES': 'two'},
    'env-process-id-out-of-range': {'LM_COORDINATOR_ADDRESS': 'localhost:1', 'LM_NUM_PROCESSES': '2',
                                    'LM_PROCESS_ID': '2'},
}

# Cases whose run directory already holds a checkpoint: (how it was trained, how it is damaged).
EXISTING_RUN = {
    'checkpoint-wrong-model-shape': ([], None),
    'checkpoint-wrong-optimizer': ([], None),
    'checkpoint-all-unreadable': ([], 'damage'),
    'checkpoint-partial-other-base': (['--config.train.trainable=regex:attn'], None),
    'checkpoint-partial-as-full': (['--config.train.trainable=regex:attn'], None),
    'checkpoint-lora-rank-mismatch': (['--config.train.trainable=lora', '--config.model.lora.rank=4'], None),
}

FILES = {
    'empty.txt': b'',
    'malformed.jsonl': b'{"text": "fine"}\n{"text": \n',
    'body.jsonl': b'{"body": "no text field"}\n',
    'object.json': b'{"text": "not a list"}',
    'latin1.txt': 'caf\u00e9 cr\u00e8me'.encode('latin-1'),
    'one_doc.txt': b'A single document.',
    'list.jsonl': b'[1, 2]\n',
    'broken.json': b'[{"text": ',
    'no_get_config.py': b'CONFIG = 1\n',
    'syntax_error.py': b'def get_config(arg=None):\n  return (\n',
    'raises.py': b"def get_config(arg=None):\n  raise ValueError(f'no variant {arg!r}')\n",
}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp('inputs')
  for name, content in FILES.items():
    (d / name).write_bytes(content)
  corpus = lm_runs.write_corpus(str(d / 'docs.jsonl'))
  data_args = [f'--config.data.train_files={corpus}']
  tokenizer = pipeline.load_tokenizer(lm_runs.tiny_config(*data_args).data, str(d / 'tok'))
  _hf_directory_lacking(str(d / 'hf'), 'model.norm.weight')
  return d, [*data_args, f'--config.data.tokenizer={tokenizer.path}']


def _hf_directory_lacking(path: str, tensor: str) -> None:
  """A Hugging Face model directory of the tiny model, with one tensor left out."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  cfg = lm_runs.tiny_config()
  hf.save(path, train_lib.Trainer(cfg, devices=jax.devices()[:1]).init_state().params, cfg.model)
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  del tensors[tensor]
  save_file(tensors, file, metadata={'format': 'pt'})


def _make_existing_run(workdir, args, damage):
  cfg = lm_runs.tiny_config(*args)
  trainer = train_lib.Trainer(cfg, devices=jax.devices()[:1])
  ckpt = train_lib.make_checkpointer(cfg, str(workdir), trainer.labels)
  ckpt.save(2, trainer.init_state(), {'position': 2})
  ckpt.close()
  if damage:
    lm_runs.damage_checkpoint(os.path.join(workdir, 'checkpoints', '2'))


def _tree(path) -> dict:
  out = {}
  for root, dirs, files in os.walk(path):
    for name in dirs + files:
      p = os.path.join(root, name)
      out[os.path.relpath(p, path)] = os.path.getsize(p) if os.path.isfile(p) else -1
  return out


# Orbax abandons its other reads once one fails; the coroutines it drops are not our concern.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('case', list(CASES))
def test_bad_input(case, prepared, tmp_path, capfd, monkeypatch):
  d, base_args = prepared
  extra, message = CASES[case]
  run = tmp_path / 'run'
  for k, v in ENV.get(case, {}).items():
    monkeypatch.setenv(k, v)
  fill = lambda a: a.format(run=run, d=d)  # pylint: disable=unnecessary-lambda-assignment
  if extra[:1] == ['lm']:
    argv = [fill(a) for a in extra[1:]]
  else:
    argv = ['train', '--workdir', str(run), *lm_runs.TINY, '--config.data.batch_size=8',
            '--config.mesh.shape.data=-1', *base_args, *[fill(a) for a in extra]]
  if case in EXISTING_RUN:
    trained_with, damage = EXISTING_RUN[case]
    _make_existing_run(run, [*base_args, *trained_with], damage)
  before = _tree(run) if run.exists() else None
  capfd.readouterr()

  code = cli.main(argv)

  err = capfd.readouterr().err
  lines = [l for l in err.strip().splitlines() if not l.startswith('lm: warning:')]
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith('lm: error: ') and message in lines[0], err
  print(f'{case}: {lines[0]}')
  if before is None:
    assert not run.exists(), os.listdir(run)
  elif case == 'checkpoint-all-unreadable':  # set aside for inspection, not deleted
    assert os.listdir(run / 'checkpoints') == [] and len(os.listdir(run / UNREADABLE)) == 1
  else:
    assert _tree(run) == before
  for path in (d / 'empty.txt',):  # a bad --workdir must not turn into output either
    assert path.read_bytes() == b''
  assert not os.path.exists('gs:')


def test_the_real_command_exits_2(tmp_path):
  out = subprocess.run([lm_runs.PYTHON, '-m', 'lm', 'train', '--config', 'configs/quickstart.py',
                        '--workdir', str(tmp_path / 'run'), '--config.optimizer.lrr=1'],
                       cwd=ROOT, env=lm_runs.env(str(tmp_path / 'cache')), capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip() == "lm: error: unknown config key 'optimizer.lrr'; did you mean 'lr'?"
  assert not (tmp_path / 'run').exists()


def test_every_case_is_in_the_docs_table():
  with open(os.path.join(ROOT, 'docs', 'bad_inputs.md'), encoding='utf-8') as f:
    documented = set(re.findall(r'^\| `([a-z0-9-]+)` \|', f.read(), re.M))
  assert documented == set(CASES)
  assert len(CASES) >= 30
