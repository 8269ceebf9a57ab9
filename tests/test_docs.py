"""Every command shown in README.md and docs/ runs here, or is marked as needing hardware.

Fenced blocks say what they are in their info string:

  ```sh               commands this file runs, block after block, in a fresh copy of the repository
  ```sh ci            the test command itself, or a part of it: CI runs it (.ci/run)
  ```sh needs-gpu     needs hardware this project's CI does not have (also needs-tpu, needs-slurm);
                      launcher commands there are still run here with --dry-run added
  ```text, ```python  output and code (docs/api.md's example runs in tests/test_api.py)

Runnable commands run at CI size: `lm train` gets CI_TRAIN's overrides appended (they win over the
command's own; CI_TRAIN_FOR_PAGE adds a few for costly pages), `lm eval`/`lm compare` get CI_EVAL's,
`lm generate` 8 new tokens, benchmarks fewer steps and smaller shapes. SUBSTITUTIONS lists the few other
edits, each of which must still match its doc.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED_DATA, TEST_XLA_FLAGS

DOCS = ['README.md'] + sorted(f'docs/{n}' for n in os.listdir(os.path.join(ROOT, 'docs'))
                              if n.endswith('.md'))
SHELL = ('sh', 'bash')
HARDWARE_TAGS = ('needs-gpu', 'needs-tpu', 'needs-slurm')
TAGS = ('ci',) + HARDWARE_TAGS
OTHER_LANGUAGES = ('text', 'python')

# The model shrinks too (one layer of width 64: a page claims that its commands run and what they
# write, not how well the model learns); runs that start from weights (train.init_from) take the
# shape of those weights whatever these say, so every page's fine-tunes still line up.
CI_TRAIN = ('--config.train.steps=4 --config.train.log_every=1 --config.train.eval_every=4 '
            '--config.train.checkpoint_every=2 --config.train.eval_batches=1 '
            '--config.train.eval_task_limit=4 --config.data.batch_size=4 '
            '--config.model.n_layers=1 --config.model.d_model=64 --config.model.mlp_dim=128')
CI_EVAL = '--config.limit=2 --config.max_new_tokens=8'
# `lm bench`, `lm bench finetune` and `lm plan` on a one-layer model: the page shows the command
# and what it prints (lm beside HF transformers; the plan's memory table), not the figures, which
# docs/ took at full size (tests/bench/test_plan.py checks the plans' figures at test size). `lm bench
# rollout` and `lm bench decode` run without their transformers column (transformers' GGUF loader
# took 18 of decode's 31 s on SmolLM2); tests/bench/test_decode.py runs decode's both columns on a
# tiny model.
CI_BENCH_MODEL = ('--config.model.n_layers=1 --config.model.d_model=64 --config.model.mlp_dim=128 '
                  '--config.model.vocab_size=512')
# Pages whose runs cost far more than CI_TRAIN's size alone makes them: overrides appended to
# CI_TRAIN for that page only.
CI_TRAIN_FOR_PAGE = {
    # A 135M-parameter model from its GGUF file: 2 steps of one 256-token row, not 4 steps of 4
    # rows (at 4 rows a step took ~10 s on 2 CPU cores, most of the page's training time); the
    # step-2 checkpoint is the one the page exports.
    'docs/smollm2.md': ('--config.data.batch_size=1 --config.train.steps=2 '
                        '--config.train.eval_every=2'),
}

# Pages whose time goes into running a real model rather than compiling small programs: they run
# without conftest's TEST_XLA_FLAGS (unoptimised machine code would make them slower, not faster).
EXECUTION_BOUND = ('docs/smollm2.md',)

# Bash functions shadowing `lm` and `python` for the blocks: the commands run as written, at CI size.
PREAMBLE = f'''set -euo pipefail
CI_TRAIN="{CI_TRAIN}"
CI_EVAL="{CI_EVAL}"
CI_BENCH_MODEL="{CI_BENCH_MODEL}"
lm() {{
  case "$1" in
    train) command lm "$@" $CI_TRAIN ;;
    eval|compare) command lm "$@" $CI_EVAL ;;
    plan) command lm "$@" $CI_BENCH_MODEL ;;
    generate) command lm "$@" --max-new-tokens 8 ;;
    bench)
      case "${{2:-}}" in
        finetune) command lm "$@" --steps 1 --rounds 1 $CI_BENCH_MODEL ;;
        decode) command lm "$@" --reps 1 --batch 1 --new-tokens 4 --no-hf ;;
        rollout) command lm "$@" --concurrency 2 --completions 4 --group 2 --prompt-len 8 --new-tokens 4 --no-hf ;;
        checkpoint) command lm "$@" --config.model.n_layers=1 --config.model.vocab_size=2048 ;;
        moe) command lm "$@" --steps 2 --layers 1 --seq-len 32 --batch 2 ;;
        hybrid) command lm "$@" --seq-lens 64 --steps 1 --d-model 64 ;;
        attention|data|gpu) command lm "$@" --steps 2 ;;
        *) command lm "$@" --steps 2 $CI_BENCH_MODEL ;;
      esac ;;
    *) command lm "$@" ;;
  esac
}}
python() {{
  case "$1 ${{2:-}}" in
    "-m launch.local"|"-m launch.sweep") command python "$@" $CI_TRAIN ;;
    *) command python "$@" ;;
  esac
}}
'''

# (doc, text in the doc, what runs instead): edits the CI-size overrides cannot express.
SUBSTITUTIONS = [
    # The full quickstart's install is CI's own (`.ci/run` installs the package the same way).
    ('README.md', 'python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/lm train',
     'lm train'),
    ('docs/quickstart.md',
     'python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/lm train', 'lm train'),
    # The rollout benchmark's workload on the page's own small run instead of SmolLM2's GGUF (its
    # 30 layers took 19 of the page's ~105 s, now 4): the command and its table are what the page
    # shows; tests/eval/test_rollout.py checks the engine against the batch generator.
    ('docs/evaluation.md', 'lm bench rollout --model ../shared/data/smollm2-135m-instruct',
     'lm bench rollout --model runs/quickstart'),
    # The drill kills the run after its step-2 checkpoint instead of after step 300's.
    ('docs/reliability.md', 'LM_INJECT_FAULT=kill@350', 'LM_INJECT_FAULT=kill@3'),
    ('docs/reliability.md', 'resumes from step 300', 'resumes from step 2'),
]


def blocks(doc):
  """(line number, language, tags, code) of every fenced block in `doc`."""
  with open(os.path.join(ROOT, doc), encoding='utf-8') as f:
    lines = f.read().split('\n')
  out, i = [], 0
  while i < len(lines):
    m = re.match(r'^```(.*)$', lines[i])
    if not m:
      i += 1
      continue
    info = m.group(1).split()
    start, i = i + 1, i + 1
    while not lines[i].startswith('```'):
      i += 1
    out.append((start, info[0] if info else '', tuple(info[1:]), '\n'.join(lines[start:i])))
    i += 1
  return out


def runnable(doc):
  return [(n, code) for n, lang, tags, code in blocks(doc) if lang in SHELL and not tags]


def commands(code):
  """The logical command lines of a shell block: continuations joined, comments dropped."""
  joined = re.sub(r'\\\n\s*', ' ', code)
  out = []
  for line in joined.split('\n'):
    line = line.strip()
    if line and not line.startswith('#'):
      out.append(line)
  return out


def test_every_block_says_what_it_is():
  problems = []
  for doc in DOCS:
    for n, lang, tags, _ in blocks(doc):
      where = f'{doc}:{n}'
      if lang in SHELL:
        unknown = [t for t in tags if t not in TAGS]
        if unknown or len(tags) > 1:
          problems.append(f'{where}: tags {tags}; use none, or one of {TAGS}')
      elif lang not in OTHER_LANGUAGES:
        problems.append(f'{where}: language {lang!r}; use one of {SHELL + OTHER_LANGUAGES}')
      elif tags:
        problems.append(f'{where}: tags {tags} on a {lang} block')
  assert not problems, '\n'.join(problems)


def test_ci_blocks_are_what_ci_runs():
  """`ci` blocks are the README's test command, which is .ci/run's, or a part of the suite."""
  with open(os.path.join(ROOT, '.ci', 'run'), encoding='utf-8') as f:
    ci_script = f.read()
  seen = 0
  for doc in DOCS:
    for _, lang, tags, code in blocks(doc):
      if lang in SHELL and 'ci' in tags:
        for command in commands(code):
          seen += 1
          part_of_suite = re.fullmatch(r'python -m pytest tests/test_\w+\.py( -q)?', command)
          assert command in ci_script or part_of_suite, f'{doc}: {command!r} is not what CI runs'
  assert seen >= 2


def test_substitutions_still_match_their_docs():
  for doc, old, _ in SUBSTITUTIONS:
    assert any(old in code for _, code in runnable(doc)), f'{doc} no longer shows {old!r}'


def _sandbox(tmp_path):
  """A copy of the repository's layout (configs and launch linked, docs and runs empty) beside
  a link to ../shared, so the docs' relative paths mean what they mean in a clone."""
  repo = tmp_path / 'repo'
  repo.mkdir()
  for name in ('configs', 'launch'):
    os.symlink(os.path.join(ROOT, name), repo / name)
  (repo / 'docs').mkdir()
  os.symlink(os.path.abspath(os.path.join(SHARED_DATA, '..')), tmp_path / 'shared')
  return repo


def _environment(tmp_path_factory, doc=None):
  env = dict(os.environ)
  env['PATH'] = os.path.dirname(sys.executable) + os.pathsep + env.get('PATH', '')
  env.update(JAX_PLATFORMS='cpu', TQDM_DISABLE='1',
             XLA_FLAGS='' if doc in EXECUTION_BOUND else TEST_XLA_FLAGS,
             # Runs of one model shape compile once for the whole session.
             JAX_COMPILATION_CACHE_DIR=os.environ.get(
                 'LM_TEST_JAX_CACHE', str(tmp_path_factory.getbasetemp() / 'jax-cache')),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return env


def _script(doc):
  parts = [PREAMBLE]
  if doc in CI_TRAIN_FOR_PAGE:
    parts.append(f'CI_TRAIN="$CI_TRAIN {CI_TRAIN_FOR_PAGE[doc]}"')
  for n, code in runnable(doc):
    for d, old, new in SUBSTITUTIONS:
      if d == doc:
        code = code.replace(old, new)
    parts.append(f'echo "=== {doc}:{n}"\n{code}\n')
  return '\n'.join(parts)


def _check_sweeps(repo):
  """The local sweep of configs/sweep_lr.py: three runs, a table naming the best, a plot."""
  sweep_dir = repo / 'runs' / 'sweep_lr'
  rows = json.loads((sweep_dir / 'summary.json').read_text())
  assert [r['name'] for r in rows] == ['lr=0.003', 'lr=0.001', 'lr=0.0003']
  assert all(r['status'] == 'ok' and r['steps'] == 4 and r['final_loss'] < 8 for r in rows)
  table = (sweep_dir / 'summary.md').read_text()
  assert table.count('| ok |') == 3 and 'Best run by best eval loss' in table
  assert (sweep_dir / 'summary.png').read_bytes()[:4] == b'\x89PNG'


def _check_launch(repo):
  """Two processes joined by jax.distributed trained one run, each writing its own log."""
  assert json.loads((repo / 'runs' / 'two-procs' / 'summary.json').read_text())['step'] == 4
  assert (repo / 'runs' / 'two-procs' / 'train.1.log').is_file()


def _check_evaluation(repo):
  report = repo / 'docs' / 'evaluation_example'
  table = (report / 'compare.md').read_text()
  assert 'full' in table and 'lora' in table
  assert (report / 'scores.png').read_bytes()[:4] == b'\x89PNG'
  assert (repo / 'completions.jsonl').read_text().count('\n') == 2


def _check_reliability(repo):
  summary = json.loads((repo / 'runs' / 'drill' / 'summary.json').read_text())
  assert summary['step'] == 4


CHECKS = {'docs/launch.md': _check_launch, 'docs/sweeps.md': _check_sweeps, 'docs/evaluation.md': _check_evaluation,
          'docs/reliability.md': _check_reliability}


@pytest.mark.skipif(not os.path.isdir(SHARED_DATA), reason='needs ../shared/data (CI has it)')
@pytest.mark.parametrize('doc', [d for d in DOCS if runnable(d)])
def test_doc_commands_run(doc, tmp_path, tmp_path_factory):
  repo = _sandbox(tmp_path)
  proc = subprocess.run(['bash', '-c', _script(doc)], cwd=repo, env=_environment(tmp_path_factory, doc),
                        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, f'{doc}: a command failed (exit {proc.returncode}):\n{output[-4000:]}'
  if doc in CHECKS:
    CHECKS[doc](repo)


def test_hardware_launch_commands_pass_their_dry_run(tmp_path, tmp_path_factory):
  """Commands for a SLURM cluster or a TPU pod are checked as far as this machine can: their
  launcher, given --dry-run, accepts every argument and prints what it would run."""
  repo = _sandbox(tmp_path)
  env = _environment(tmp_path_factory)
  checked = 0
  for doc in DOCS:
    for n, lang, tags, code in blocks(doc):
      if lang not in SHELL or not set(tags) & set(HARDWARE_TAGS):
        continue
      for command in commands(code):
        if not command.startswith('python -m launch.'):
          continue
        argv = shlex.split(command)[1:]
        proc = subprocess.run(
            [sys.executable] + argv + ['--dry-run'] * ('--dry-run' not in argv),
            cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f'{doc}:{n}: {command}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}'
        assert proc.stdout.strip(), f'{doc}:{n}: the dry run printed nothing'
        checked += 1
  assert checked >= 5

