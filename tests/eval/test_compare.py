"""End to end on tiny runs: evaluation during training and early stopping, `lm eval`,
`lm generate` and `lm compare` (table and plots)."""

import json
import os

import pytest
from conftest import ROOT, tiny_config
from data_util import needs_shared

from lm import cli
from lm.train import loop as train_lib
from lm.train.metrics import read_metrics

# The built-in tasks these runs evaluate (gsm8k_choice, wiki_ppl) read ../shared/data.
pytestmark = needs_shared

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  import pydoc_data.topics
  root = tmp_path_factory.mktemp('runs')
  corpus = root / 'docs.jsonl'
  with open(corpus, 'w') as f:
    for key in sorted(pydoc_data.topics.topics)[:40]:
      f.write(json.dumps({'text': pydoc_data.topics.topics[key]}) + '\n')
  c = tiny_config(vocab_size=512, max_seq_len=64)
  c.data.update(train_files=str(corpus), tokenizer_vocab_size=512, seq_len=32, batch_size=8)
  c.train.update(steps=8, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=2,
                 eval_tasks='gsm8k_choice', eval_task_limit=2,
                 # No evaluation improves eval_loss by 100: the second evaluation stops the run.
                 early_stopping_metric='eval_loss', early_stopping_patience=1,
                 early_stopping_min_delta=100.0)
  c.metrics.update(peak_flops_per_device=1e12, tensorboard=False)
  c.mesh.shape.update(data=-1)
  base = str(root / 'base')
  summary = train_lib.train(c, base, progress=False)
  # LoRA fine-tuning from the base: its checkpoints hold only the adapters.
  tuned = str(root / 'tuned')
  c.model.lora.update(rank=4, alpha=8.0)
  c.train.update(steps=2, init_from=base, trainable='lora', eval_tasks='', early_stopping_metric='')
  train_lib.train(c, tuned, progress=False)
  return base, tuned, summary


def test_early_stopping_and_task_metrics_during_training(runs):
  base, _, summary = runs
  assert summary['early_stopped_at'] == 4 and summary['step'] == 4
  assert summary['early_stopping_best_step'] == 2
  evals = [r for r in read_metrics(base) if 'eval_loss' in r]
  assert [r['step'] for r in evals] == [2, 4]
  assert all('gsm8k_choice/accuracy' in r for r in evals)


def test_a_lora_runs_mfu_counts_the_flops_its_step_needs(runs):
  """The MFU the loop logs counts what `lm plan` counts for the run's mode (LoRA: no gradients of
  the frozen base weights), not the 6N of full training it used to count (over 100% on LoRA runs)."""
  import jax
  from lm.io import runs as runs_lib
  from lm.train import step_flops
  _, tuned, _ = runs
  cfg = runs_lib.load_config(tuned)
  need = step_flops.batch_token_flops(train_lib.Trainer(cfg))
  logged = [r for r in read_metrics(tuned) if 'mfu' in r]
  per_token = [r['mfu'] * 1e12 * jax.device_count() / r['tokens_per_s'] for r in logged]
  assert cfg.train.trainable == 'lora' and per_token == pytest.approx([need] * len(logged), rel=1e-6)
  cfg.train.trainable = 'all'
  assert need < step_flops.batch_token_flops(train_lib.Trainer(cfg))


def test_eval_and_generate_cli(runs, tmp_path, capsys):
  base, tuned, _ = runs
  out = str(tmp_path / 'eval')
  assert cli.main(['eval', f'base={base}@2', tuned, '--tasks', 'wiki_ppl', '--out', out,
                   '--config', os.path.join(ROOT, 'configs', 'eval', 'default.py:quick'),
                   '--config.limit=1']) == 0
  results = json.load(open(os.path.join(out, 'results.json')))['results']
  assert set(results) == {'base', 'tuned'} and results['base']['wiki_ppl']['perplexity'] > 1
  assert '| base |' in open(os.path.join(out, 'results.md')).read()
  assert cli.main(['generate', tuned, '--prompt', 'The', '--max-new-tokens', '4',
                   '--temperature', '0.7', '--top-k', '20']) == 0
  assert capsys.readouterr().out.count('The') >= 1


def test_compare_writes_table_and_plots(runs, tmp_path):
  base, tuned, _ = runs
  out = str(tmp_path / 'compare')
  assert cli.main(['compare', '--base', base, '--finetuned', f'ft={tuned}', '--out', out,
                   '--tasks', 'gsm8k,gsm8k_choice', '--general', 'wiki_ppl,heldout_ppl',
                   '--shots', '1', '--config.limit=2', '--config.max_new_tokens=4']) == 0
  md = open(os.path.join(out, 'compare.md')).read()
  for row in ('| base |', '| base 1-shot |', '| ft |'):
    assert row in md
  assert 'Forgetting' in md and 'Pretraining compute / fine-tuning compute: ft ' in md
  report = json.load(open(os.path.join(out, 'compare.json')))
  base_c, ft_c = report['compute']['base'], report['compute']['ft']
  assert (base_c['steps'], ft_c['steps'], ft_c['first_step']) == (4, 2, 0)
  # LoRA skips the frozen weights' gradient matmuls: about 4N instead of 6N FLOPs per token.
  per_token = lambda c: c['flops'] / c['tokens']
  assert 0.6 < per_token(ft_c) / per_token(base_c) < 0.75
  for png in ('scores.png', 'loss_curves.png'):
    with open(os.path.join(out, png), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_compare_with_a_pretrained_base(runs, tmp_path):
  """The base as a user downloads it (here the base run exported to GGUF and to a Hugging Face
  directory): compared with the fine-tune, the compute table puts the fine-tune's FLOPs beside
  6 x parameters x the tokens the base was pretrained on."""
  pytest.importorskip('gguf')
  from lm.io import pretrained
  base, tuned, _ = runs
  pretrained.export_run(base, str(tmp_path / 'gguf' / 'base.gguf'), fmt='gguf', dtype='f16')
  pretrained.export_run(base, str(tmp_path / 'hf'), fmt='hf')
  for source in (tmp_path / 'gguf', tmp_path / 'hf'):
    out = str(tmp_path / f'compare_{source.name}')
    assert cli.main(['compare', '--base', f'base={source}', '--finetuned', f'ft={tuned}',
                     '--out', out, '--tasks', 'gsm8k_nll', '--general', 'wiki_ppl', '--shots', '0',
                     '--config.limit=1', '--base-pretraining-tokens', '2e6']) == 0
    report = json.load(open(os.path.join(out, 'compare.json')))
    base_c, ft_c = report['compute']['base'], report['compute']['ft']
    assert base_c['flops'] == 6 * base_c['parameters'] * 2e6 and base_c['trainable'] == 'pretraining'
    assert ft_c['steps'] == 2 and ft_c['flops'] > 0
    md = open(os.path.join(out, 'compare.md')).read()
    assert '| base | pretraining (estimate) | | 2e+06 |' in md
    assert '6 x parameters x tokens' in md and 'FLOPs vs base pretraining' in md
    assert f'Pretraining compute / fine-tuning compute: ft {base_c["flops"] / ft_c["flops"]:.3g}x' in md
    assert report['forgetting']['ft']['wiki_ppl']['perplexity'] > 1
  # A published model is loaded as its own init_from: a preference task must not score it against
  # itself (a reward accuracy of 0); it has no reference, like a run trained from scratch.
  from lm.eval import evaluate, tasks  # pylint: disable=import-outside-toplevel
  published = evaluate.load_model(f'pub={tmp_path / "hf"}')
  with open(tmp_path / 'pairs.jsonl', 'w') as f:
    f.write(json.dumps({'prompt': 'Hi.', 'chosen': 'Hello.', 'rejected': 'Go.'}) + '\n')
  with open(tmp_path / 'pref.yaml', 'w') as f:
    f.write('kind: preference\ndata: pairs.jsonl\n')
  out = tasks.run(str(tmp_path / 'pref.yaml'), published, tasks.Settings(limit=0, batch_size=2))
  assert out['reference'] == 'none' and 'reward_accuracy' not in out and out['n'] == 1


def test_compare_refuses_a_bad_base_in_one_line(runs, tmp_path, capsys):
  import subprocess
  import sys
  base, tuned, _ = runs
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'lm', 'compare', '--base', str(tmp_path / 'missing'), '--finetuned',
       tuned, '--out', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 2 and not out.exists()
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('lm: error: --base=') and 'Hugging Face model directory' in last
  # A pretrained base has no held-out split of its own run: heldout_ppl is refused before loading.
  pretrained_dir = tmp_path / 'hf'
  from lm.io import pretrained
  pretrained.export_run(base, str(pretrained_dir), fmt='hf')
  capsys.readouterr()
  assert cli.main(['compare', '--base', str(pretrained_dir), '--finetuned', tuned, '--out', str(out),
                   '--general', 'wiki_ppl,heldout_ppl']) == 2
  assert 'has no held-out split for heldout_ppl; drop heldout_ppl' in capsys.readouterr().err
  assert not out.exists()
