"""`lm compare`: did fine-tuning help, compared with the base model and with the base model given
a few-shot prompt, what did it cost in general ability, and what did it cost in compute?

The base is an lm run (its training compute is read from its metrics) or a pretrained model, a
Hugging Face directory or a GGUF file (its pretraining compute estimated as 6 x parameters x
tokens from `base_pretraining_tokens`, the number of tokens its makers report).

Writes into the output directory:
  compare.md      task scores (base, base k-shot, each fine-tuned model), forgetting (general-text
                  perplexity before and after), compute (FLOPs and wall time of every run, beside
                  the base's pretraining compute)
  compare.json    every figure behind the tables
  scores.png      each task's headline metric per model
  loss_curves.png training and held-out loss of every run
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os

from lm.eval import evaluate
from lm.errors import UserError
from lm.io import output, runs
from lm.train import flops as flops_lib
from lm.train import partition
from lm.eval import tasks as tasks_lib
from lm.train.metrics import plot_loss_curves, read_metrics
from lm.train.state import ModelSpec

OUTPUTS = ('compare.json', 'compare.md', 'scores.png', 'loss_curves.png', 'items')  # what it writes


def training_compute(run_dir: str) -> dict:
  """Steps, tokens, FLOPs and wall time the run's own training took (not its initialisation).

  FLOPs per token are 6N + attention for full training; frozen weights skip their weight-gradient
  matmul, so each frozen matmul parameter saves 2 FLOPs per token (LoRA: ~4N). Wall time is the sum
  of the logged throughput windows, so evaluation and checkpoint time are excluded.
  """
  cfg = runs.load_config(run_dir)
  records = [r for r in read_metrics(run_dir) if 'loss' in r and 'tokens_per_s' in r]
  if not records:
    return {}
  records.sort(key=lambda r: r['step'])
  every = cfg.train.log_every
  start = (records[0]['step'] - 1) // every * every  # the step it started (or resumed) from
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  seconds, previous = 0.0, start
  for r in records:
    seconds += (r['step'] - previous) * tokens_per_step / max(r['tokens_per_s'], 1e-9)
    previous = r['step']
  spec = ModelSpec(cfg.model)
  labels = partition.labels(spec.names, cfg.train.trainable)
  frozen = sum(math.prod(s.shape) for n, s in spec.shapes.items()
               if labels[n] == partition.FROZEN and n.endswith('kernel'))
  per_token = flops_lib.train_flops_per_token(cfg.model, cfg.data.seq_len) - 2.0 * frozen
  steps = records[-1]['step'] - start
  return {'steps': steps, 'first_step': start, 'tokens': steps * tokens_per_step,
          'flops': steps * tokens_per_step * per_token, 'wall_seconds': seconds,
          'trainable': cfg.train.trainable}


def pretraining_compute(spec: ModelSpec, tokens: float) -> dict:
  """The usual estimate of a model's pretraining compute: 6 x parameters x tokens (forward 2N,
  backward 4N FLOPs per token; attention left out)."""
  params = sum(math.prod(s.shape) for s in spec.shapes.values())
  return {'tokens': tokens, 'flops': 6.0 * params * tokens, 'parameters': params,
          'trainable': 'pretraining', 'estimated': True}


def _check_runs(base_dir: str, finetuned: list[str], general: list, task_names: list) -> bool:
  """Each model exists (one line naming the flag otherwise); True when the base is a pretrained
  model (HF directory or GGUF) rather than an lm run. Runs before any model loads."""
  pretrained_base = runs.kind(base_dir, '--base') != 'lm'
  for spec in finetuned:
    runs.kind(evaluate.parse_run(spec)[1], '--finetuned')
  if pretrained_base:
    for task in [tasks_lib.resolve(t) for t in [*task_names, *general]]:
      if task.data == tasks_lib.HELDOUT:
        raise UserError(f'--base {base_dir} is a pretrained model without a run, so it has no '
                        f'held-out split for {task.name}; drop {task.name} from --general/--tasks '
                        '(e.g. --general wiki_ppl)')
  return pretrained_base


def compare(base: str, finetuned: list[str], out_dir: str, *, task_names: list,
            general: list, shots: int, settings: tasks_lib.Settings, log=print,
            progress: bool = False, base_pretraining_tokens: float | None = None) -> dict:
  """Runs the comparison; returns what compare.json holds. `task_names` and `general`: built-in
  names, task files or parsed tasks. `base` is an lm run, a Hugging Face directory or a GGUF file;
  `base_pretraining_tokens` (the tokens the base was pretrained on) puts 6 x parameters x tokens in
  the compute table as the base's row, in place of an lm base run's measured compute."""
  base_dir = evaluate.parse_run(base)[1]
  sources = [base_dir] + [evaluate.parse_run(s)[1] for s in finetuned]
  output.check(out_dir, '--out', sources, kind='comparison', folder=True, any_source=True,
               legacy=OUTPUTS)  # before any model loads: the cheap error first
  pretrained_base = _check_runs(base_dir, finetuned, general, task_names)
  if base_pretraining_tokens is not None and not base_pretraining_tokens > 0:
    raise UserError(f'--base-pretraining-tokens {base_pretraining_tokens}: give the number of '
                    'tokens the base was pretrained on, e.g. 2e12')
  run_tasks = functools.partial(evaluate.run_tasks, log=log, progress=progress)
  # heldout_ppl measures the pretraining text: the base run's held-out split, where it has one.
  settings = dataclasses.replace(settings, heldout_from='' if pretrained_base else base_dir)
  few_shot = dataclasses.replace(settings, shots=shots)
  scores, forgetting = {}, {}

  base_model = evaluate.load_model(base)
  log(f'base {base_model.name}: {base_model.run_dir} step {base_model.step}')
  base_name = base_model.name
  base_spec = base_model.spec
  scores[base_name] = run_tasks(base_model, task_names, settings)
  if shots:
    scores[f'{base_name} {shots}-shot'] = run_tasks(base_model, task_names, few_shot)
  forgetting[base_name] = run_tasks(base_model, general, settings)
  del base_model

  for spec in finetuned:
    model = evaluate.load_model(spec, mesh=None)
    log(f'fine-tuned {model.name}: {model.run_dir} step {model.step}')
    scores[model.name] = run_tasks(model, task_names, settings)
    forgetting[model.name] = run_tasks(model, general, settings)

  trained = {evaluate.parse_run(s)[0]: evaluate.parse_run(s)[1] for s in finetuned}
  if not pretrained_base:
    trained = {base_name: base_dir, **trained}
  compute = {name: training_compute(d) if runs.kind(d) == 'lm' else {}
             for name, d in trained.items()}
  if base_pretraining_tokens is not None:
    compute[base_name] = pretraining_compute(base_spec, base_pretraining_tokens)
  elif pretrained_base:
    compute[base_name] = {}
  compute = {base_name: compute[base_name], **compute}  # the base's row first
  scores, items = evaluate.split_items(scores)
  forgetting, general_items = evaluate.split_items(forgetting)
  report = {'scores': scores, 'forgetting': forgetting, 'compute': compute, 'base': base_name,
            'shots': shots, 'settings': dataclasses.asdict(settings)}
  with output.directory(out_dir, '--out', sources, kind='comparison', any_source=True,
                        legacy=OUTPUTS) as partial:
    with open(os.path.join(partial, 'compare.json'), 'w', encoding='utf-8') as f:
      json.dump(report, f, indent=2)
    with open(os.path.join(partial, 'compare.md'), 'w', encoding='utf-8') as f:
      f.write(markdown(report))
    evaluate.write_items(partial, {**items, **general_items})
    plot_scores(report, os.path.join(partial, 'scores.png'))
    plot_loss_curves({name: read_metrics(d) for name, d in trained.items()},
                     os.path.join(partial, 'loss_curves.png'),
                     ylabel='loss (nats/token, on each run\'s own data)')
  return report


def _pct(new, old):
  return f'{100 * (new - old) / old:+.1f}%' if old else ''


def markdown(report: dict) -> str:
  base, shots = report['base'], report['shots']
  s = report['settings']
  decoding = ('greedy decoding' if not s['temperature'] else
              f'sampling at temperature {s["temperature"]}, top-k {s["top_k"] or "off"}, '
              f'top-p {s["top_p"]}, seed {s["seed"]}')
  out = ['# Base vs fine-tuned\n',
         f'{s["limit"] or "all"} held-out examples per task; {decoding}; up to '
         f'{s["max_new_tokens"]} new tokens; `{base} {shots}-shot` is the base model prompted with '
         f'{shots} solved training examples.\n',
         '## Task scores\n']
  scores = report['scores']
  tasks = list(dict.fromkeys(t for m in scores.values() for t in m))
  columns = []
  for t in tasks:
    first = next(m[t] for m in scores.values() if t in m)
    metrics = [k for k, v in first.items() if isinstance(v, float) and k not in ('seconds',)]
    columns += [(t, k) for k in metrics]
  out.append(evaluate.markdown_table(scores, columns))
  out.append('## Forgetting: general text before and after\n')
  general = list(dict.fromkeys(t for m in report['forgetting'].values() for t in m))
  before = report['forgetting'][base]
  lines = ['| model | ' + ' | '.join(f'{t} {before[t]["headline"]}' for t in general) + ' |',
           '|' + '---|' * (len(general) + 1)]
  for name, res in report['forgetting'].items():
    cells = []
    for t in general:
      key = before[t]['headline']
      value = res[t][key]
      change = '' if name == base else f' ({_pct(value, before[t][key])})'
      cells.append(f'{value:.2f}{change}')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  out.append('\n'.join(lines) + '\n')
  out.append('## Compute\n')
  base_c = report['compute'].get(base, {})
  pre = base_c.get('flops')
  if base_c.get('estimated'):
    out.append(f'`{base}`\'s row is its pretraining compute estimated as 6 x parameters x tokens '
               f'(6 x {base_c["parameters"]:,} x {base_c["tokens"]:.3g}); the fine-tunes\' FLOPs '
               'are 6N + attention per token, frozen weights skipping their weight gradients.\n')
  lines = ['| run | trainable | steps | tokens | FLOPs | wall time | FLOPs vs base pretraining |',
           '|---|---|---|---|---|---|---|']
  for name, c in report['compute'].items():
    if not c:
      lines.append(f'| {name} | (no training metrics) | | | | | |')
      continue
    ratio = f'{c["flops"] / pre:.3g}x' if pre else ''
    if c.get('estimated'):
      lines.append(f'| {name} | pretraining (estimate) | | {c["tokens"]:.3g} | '
                   f'{c["flops"]:.3g} | | 1x |')
      continue
    lines.append(f'| {name} | {c["trainable"]} | {c["steps"]} (from step {c["first_step"]}) | '
                 f'{c["tokens"]:,} | {c["flops"]:.3g} | {c["wall_seconds"] / 60:.1f} min | {ratio} |')
  out.append('\n'.join(lines) + '\n')
  if pre:
    ratios = [f'{name} {pre / c["flops"]:.3g}x' for name, c in report['compute'].items()
              if name != base and c]
    if ratios:
      out.append(f'Pretraining compute / fine-tuning compute: {", ".join(ratios)}.\n')
  out.append('![scores](scores.png)\n\n![loss curves](loss_curves.png)\n')
  return '\n'.join(out)


def plot_scores(report: dict, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  panels = [(t, report['scores']) for t in dict.fromkeys(
      t for m in report['scores'].values() for t in m)]
  panels += [(t, report['forgetting']) for t in dict.fromkeys(
      t for m in report['forgetting'].values() for t in m)]
  color = {name: f'C{i}' for i, name in enumerate(report['scores'])}  # one colour per model
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
  for ax, (task, table) in zip(axes[0], panels):
    names = [n for n in table if task in table[n]]
    key = table[names[0]][task]['headline']
    higher = not tasks_lib.lower_is_better(key)
    values = [table[n][task][key] for n in names]
    ax.bar(range(len(names)), values, color=[color.get(n, 'C7') for n in names])
    ax.set_xticks(range(len(names)), names, rotation=30, ha='right', fontsize=8)
    ax.set_title(f'{task}\n{key} ({"higher" if higher else "lower"} is better)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
