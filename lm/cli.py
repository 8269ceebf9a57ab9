"""`lm SUBCOMMAND ...`: the thin entry point. Each subcommand parses flags and calls the library."""

from __future__ import annotations

import argparse
import sys

from lm.errors import EXIT_USER_ERROR, RunStopped, UserError

USAGE = """usage: lm <command> [options]

commands:
  train     lm train --config configs/quickstart.py --workdir DIR [--config.a.b=value ...]
  bench     lm bench [train|finetune|attention|checkpoint|data|moe] --config configs/bench_tiny.py [--steps N] [--no-hf]
            lm bench decode [--config configs/quickstart.py] [--batch 1,8] [--uncached]
            lm bench moe [--experts 8] [--top-k 2] [--expert-dim 128] [--seq-len 128]
  export    lm export --workdir RUN --out DIR [--adapters-only] [--dtype bfloat16]
  generate  lm generate RUN_DIR[@STEP] [--prompt TEXT ... | --prompts-file FILE] [--max-new-tokens N]
            [--temperature T] [--top-k K] [--top-p P] [--stop STR ...]   (no prompt: interactive)
  eval      lm eval RUN_DIR[@STEP] ... --tasks gsm8k,wiki_ppl --out DIR [--config configs/eval/default.py]
            [--config.limit=100 --config.shots=2 ...]
  compare   lm compare --base RUN_DIR --finetuned NAME=RUN_DIR ... --out DIR [--shots 2]
            [--tasks gsm8k,gsm8k_nll,gsm8k_choice] [--general wiki_ppl,heldout_ppl] [--limit 100]
  data      lm data show --config CONFIG [--workdir DIR] [--examples N] [--config.a.b=value ...]
"""


class _Parser(argparse.ArgumentParser):
  """argparse that raises UserError (one line) instead of printing usage and exiting."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')


def _config_from_args(args, overrides, model_preset=None):
  """The config file, then a model preset (lm bench --model-preset), then the overrides."""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load_config(args.config)
  if model_preset:
    config_lib.model_config(model_preset)  # a clear error for an unknown name
    cfg.model.update(config_lib.MODEL_PRESETS[model_preset])
  for key, value in config_lib.parse_overrides(overrides):
    config_lib.apply_override(cfg, key, value)
  config_lib.validate(cfg)
  return cfg


def cmd_train(argv):
  parser = _Parser(prog='lm train', allow_abbrev=False)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  parser.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
  parser.add_argument('--no-progress', action='store_true')
  args, overrides = parser.parse_known_args(argv)
  cfg = _config_from_args(args, overrides)
  from lm import distributed  # pylint: disable=import-outside-toplevel
  from lm.train import loop as train  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(cfg.distributed)
  summary = train.train(cfg, args.workdir, progress=not args.no_progress)
  loss = f', loss {summary["loss"]:.4f}' if 'loss' in summary else ''
  held_out = train.held_out_line(cfg, summary, summary['unigram_perplexity'], final=True)
  print(f'done: step {summary["step"]}{loss}, {held_out}; run directory {args.workdir}')
  return 0


def cmd_bench(argv):
  parser = _Parser(prog='lm bench', allow_abbrev=False)
  parser.add_argument('what', nargs='?', default='train',
                      help='train (default) | finetune | attention | decode | checkpoint | data | moe')
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--model-preset', help='model shape from lm.config.MODEL_PRESETS, e.g. 125m')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--no-hf', action='store_true', help='skip the HF transformers comparison')
  args, overrides = parser.parse_known_args(argv)
  if args.what == 'finetune':
    from lm.bench import finetune as bench_finetune  # pylint: disable=import-outside-toplevel
    return bench_finetune.main([a for a in argv if a != 'finetune'])
  if args.what == 'data':  # the input pipeline's tokens/s beside the train step's
    from lm.bench import data as data_bench  # pylint: disable=import-outside-toplevel
    return data_bench.main([a for a in argv if a != 'data'])
  if args.what == 'attention':
    from lm.bench import attention as attention_bench  # pylint: disable=import-outside-toplevel
    return attention_bench.main(overrides)
  if args.what == 'moe':
    from lm.bench import moe as moe_bench  # pylint: disable=import-outside-toplevel
    return moe_bench.main([a for a in argv if a != 'moe'])
  if args.what == 'decode':  # KV-cache decoding tokens/s; --model: beside HF generate (lm/bench/decode.py)
    from lm.bench import decode as decode_bench  # pylint: disable=import-outside-toplevel
    return decode_bench.main([a for a in argv if a != 'decode'])
  if args.what not in ('train', 'checkpoint'):
    raise UserError(f'lm bench: unknown benchmark {args.what!r}; '
                    'choose train, finetune, attention, decode, checkpoint, data or moe')
  cfg = _config_from_args(args, overrides, args.model_preset)
  if args.what == 'checkpoint':
    from lm.bench import checkpoint as checkpoint_bench  # pylint: disable=import-outside-toplevel
    return checkpoint_bench.main(cfg)
  from lm.bench import train as bench  # pylint: disable=import-outside-toplevel
  bench.run(cfg, steps=args.steps, compare_hf=not args.no_hf)
  return 0


def cmd_export(argv):
  parser = _Parser(prog='lm export', allow_abbrev=False)
  parser.add_argument('--workdir', required=True, help='an lm run directory')
  parser.add_argument('--out', required=True,
                      help='the Hugging Face (or PEFT) directory, or the .gguf file, to write')
  parser.add_argument('--adapters-only', action='store_true', help='write LoRA adapters for PEFT')
  parser.add_argument('--format', default='hf', choices=('hf', 'gguf'),
                      help='hf: config.json + safetensors; gguf: one llama.cpp file')
  parser.add_argument('--dtype', help='hf: float32 (default) | bfloat16 | float16; gguf: f16 (default) | q8_0')
  args = parser.parse_args(argv)
  from lm.io import pretrained  # pylint: disable=import-outside-toplevel
  print(pretrained.export_run(args.workdir, args.out, adapters_only=args.adapters_only,
                              dtype=args.dtype, fmt=args.format))
  return 0


def _eval_settings(args, overrides):
  """Settings for lm eval / lm compare: an eval config (configs/eval/) with --config.* overrides."""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  from lm.eval import tasks  # pylint: disable=import-outside-toplevel
  import dataclasses  # pylint: disable=import-outside-toplevel
  import ml_collections  # pylint: disable=import-outside-toplevel
  if args.config:
    cfg = config_lib.load_config(args.config)
  else:
    cfg = ml_collections.ConfigDict(dataclasses.asdict(tasks.Settings()))
    cfg.tasks = ''
    cfg.lock()
  for key, value in config_lib.parse_overrides(overrides):
    config_lib.apply_override(cfg, key, value)
  fields = {f.name for f in dataclasses.fields(tasks.Settings)}
  unknown = set(cfg.keys()) - fields - {'runs', 'tasks'}
  if unknown:
    raise UserError(f'{args.config}: unknown evaluation settings {sorted(unknown)}; '
                    f'known: {sorted(fields | {"runs", "tasks"})}')
  return cfg, tasks.Settings(**{k: v for k, v in cfg.items() if k in fields})


def cmd_generate(argv):
  parser = _Parser(prog='lm generate', allow_abbrev=False)
  parser.add_argument('run', help='run directory (what lm train --workdir wrote), optionally @STEP')
  parser.add_argument('--prompt', action='append', default=[], help='a prompt; repeatable')
  parser.add_argument('--prompts-file', help='one prompt per line, or .jsonl with a "prompt" field')
  parser.add_argument('--out', help='write {"prompt", "completion"} lines here (jsonl)')
  parser.add_argument('--max-new-tokens', type=int, default=128)
  parser.add_argument('--temperature', type=float, default=0.0, help='0: greedy')
  parser.add_argument('--top-k', type=int, default=0)
  parser.add_argument('--top-p', type=float, default=1.0)
  parser.add_argument('--stop', action='append', default=[], help='stop string; repeatable')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--batch-size', type=int, default=16)
  parser.add_argument('--chat', action='store_true',
                      help="each prompt is a user message in the model's chat template "
                           '(the run\'s data.chat_template, else the tokenizer\'s own); prints the reply')
  parser.add_argument('--system', help='with --chat: a system message before each prompt')
  args = parser.parse_args(argv)
  from lm.eval import evaluate, generate  # pylint: disable=import-outside-toplevel
  sampling = generate.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  model = evaluate.load_model(args.run)
  if args.chat:
    template = model.cfg.data.get('chat_template') or 'auto'
    run = lambda prompts: model.generator.chat(prompts, sampling, template=template,
                                               system=args.system, seed=args.seed,
                                               batch_size=args.batch_size)
  else:
    run = lambda prompts: model.generator.generate(prompts, sampling, stop=args.stop, seed=args.seed,
                                                   batch_size=args.batch_size)
  prompts = list(args.prompt)
  if args.prompts_file:
    prompts += generate.read_prompts(args.prompts_file)
  if not prompts:  # interactive
    print(f'{model.name} step {model.step}: type a prompt, an empty line to quit', file=sys.stderr)
    while True:
      try:
        prompt = input('> ')
      except EOFError:
        break
      if not prompt:
        break
      print(('' if args.chat else prompt) + run([prompt])[0])
    return 0
  completions = run(prompts)
  if args.out:
    import json  # pylint: disable=import-outside-toplevel
    with open(args.out, 'w', encoding='utf-8') as f:
      for p, c in zip(prompts, completions):
        f.write(json.dumps({'prompt': p, 'completion': c}) + '\n')
    print(f'wrote {len(prompts)} completions to {args.out}')
  else:
    for p, c in zip(prompts, completions):
      print(f'> {p}\n{c}\n' if args.chat else f'{p}{c}\n')
  return 0


def cmd_eval(argv):
  parser = _Parser(prog='lm eval', allow_abbrev=False)
  parser.add_argument('runs', nargs='*', help='[NAME=]RUN_DIR[@STEP]; or set runs in --config')
  parser.add_argument('--config', help='an eval config (configs/eval/default.py[:arg])')
  parser.add_argument('--tasks', help='comma-separated; see lm/eval/tasks.py')
  parser.add_argument('--out', required=True, help='directory for results.json and results.md')
  args, overrides = parser.parse_known_args(argv)
  cfg, settings = _eval_settings(args, overrides)
  runs = args.runs or [r for r in cfg.get('runs', '').split(',') if r]
  if not runs:
    raise UserError('lm eval: name at least one run directory')
  from lm.eval import evaluate, tasks  # pylint: disable=import-outside-toplevel
  names = tasks.parse_tasks(args.tasks or cfg.tasks)
  evaluate.evaluate_runs(runs, names, settings, args.out)
  with open(f'{args.out}/results.md', encoding='utf-8') as f:
    print(f.read())
  return 0


def cmd_compare(argv):
  parser = _Parser(prog='lm compare', allow_abbrev=False)
  parser.add_argument('--base', required=True, help='[NAME=]RUN_DIR[@STEP] of the base model')
  parser.add_argument('--finetuned', nargs='+', required=True, help='[NAME=]RUN_DIR[@STEP] ...')
  parser.add_argument('--out', required=True)
  parser.add_argument('--tasks', default='gsm8k,gsm8k_nll,gsm8k_choice')
  parser.add_argument('--general', default='wiki_ppl,heldout_ppl',
                      help='general-ability tasks, run before and after (forgetting)')
  parser.add_argument('--shots', type=int, default=2, help='exemplars for the prompted base')
  parser.add_argument('--config', help='an eval config for the settings (limit, max_new_tokens...)')
  args, overrides = parser.parse_known_args(argv)
  _, settings = _eval_settings(args, overrides)
  from lm.eval import compare, tasks  # pylint: disable=import-outside-toplevel
  compare.compare(args.base, args.finetuned, args.out, task_names=tasks.parse_tasks(args.tasks),
                  general=tasks.parse_tasks(args.general), shots=args.shots, settings=settings)
  print(f'wrote {args.out}/compare.md, compare.json, scores.png, loss_curves.png')
  return 0


def cmd_data(argv):
  parser = _Parser(prog='lm data', allow_abbrev=False)
  parser.add_argument('what', choices=['show'], help='show: rendered examples with the loss mask')
  parser.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  parser.add_argument('--workdir', help='reuse (or train into) this run\'s tokenizer')
  parser.add_argument('--examples', type=int, default=3)
  parser.add_argument('--batches', type=int, default=8, help='batches measured for packing')
  args, overrides = parser.parse_known_args(argv)
  cfg = _config_from_args(args, overrides)
  from lm.data import show  # pylint: disable=import-outside-toplevel
  show.show(cfg, workdir=args.workdir, examples=args.examples, batches=args.batches)
  return 0



COMMANDS = {
    'train': cmd_train,
    'bench': cmd_bench,
    'export': cmd_export,
    'data': cmd_data,
    'generate': cmd_generate,
    'eval': cmd_eval,
    'compare': cmd_compare,
}


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(USAGE)
    return 0
  command = COMMANDS.get(argv[0])
  try:
    if command is None:
      raise UserError(f'unknown command {argv[0]!r}; run `lm --help` for the list')
    return command(argv[1:])
  except UserError as e:
    print(f'lm: error: {e}', file=sys.stderr)
    return EXIT_USER_ERROR
  except RunStopped as e:  # preempted or diverged: exit codes in lm/errors.py, docs/reliability.md
    print(f'lm: stopped: {e}', file=sys.stderr)
    return e.exit_code


if __name__ == '__main__':
  sys.exit(main())
