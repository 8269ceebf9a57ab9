"""`lm SUBCOMMAND ...`: the thin entry point. Each subcommand parses flags and calls the library."""

from __future__ import annotations

import argparse
import sys

from lm.errors import EXIT_BUG, EXIT_USER_ERROR, RunStopped, UserError

USAGE = """usage: lm <command> [options]

commands:
  train     lm train --config configs/quickstart.py --workdir DIR [--config.a.b=value ...]
  bench     lm bench [train|finetune|attention|checkpoint|data|moe] --config configs/bench_tiny.py [--steps N] [--no-hf]
            lm bench gpu --out DIR [--smoke]   (attention implementations and the 1B step, JSON + markdown)
            lm bench decode [--config configs/quickstart.py] [--batch 1,8] [--uncached]
            lm bench moe [--experts 8] [--top-k 2] [--expert-dim 128] [--seq-len 128]
  export    lm export --workdir RUN --out DIR [--adapters-only] [--dtype bfloat16]
  generate  lm generate RUN_DIR[@STEP] [--prompt TEXT ... | --prompts-file FILE] [--max-new-tokens N]
            [--temperature T] [--top-k K] [--top-p P] [--stop STR ...]   (no prompt: interactive)
  eval      lm eval RUN_DIR[@STEP] ... --tasks gsm8k,my_task.yaml --out DIR [--config configs/eval/default.py]
            [--harness hellaswag,harness_task.yaml] [--config.limit=100 --config.shots=2 ...] [--no-progress]
  compare   lm compare --base RUN_DIR|HF_DIR|GGUF --finetuned NAME=RUN_DIR ... --out DIR [--shots 2]
            [--tasks gsm8k,gsm8k_nll,gsm8k_choice] [--general wiki_ppl,heldout_ppl] [--limit 100]
            [--base-pretraining-tokens 2e12]
            [--config configs/eval/default.py] [--config.max_new_tokens=64 ...] [--no-progress]
  plan      lm plan --config CONFIG --target v5p-8|v6e-8|v5e-16|v4-8|h100x8|h200x8|2xv5p-8 [--mfu 0.4]
            [--search] [--config.a.b=value ...]   (compiles the step for the target; no hardware)
  data      lm data show --config CONFIG [--workdir DIR] [--examples N] [--config.a.b=value ...]
"""


class _Parser(argparse.ArgumentParser):
  """argparse that raises UserError (one line) instead of printing usage and exiting."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')


def _config_from_args(args, overrides, model_preset=None):
  """The config file, then a model preset (lm bench --model-preset), then the overrides."""
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  return config_lib.load_config(args.config, overrides, model_preset=model_preset)


def cmd_train(argv):
  parser = _Parser(prog='lm train', allow_abbrev=False)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  parser.add_argument('--workdir', required=True, help='run directory: checkpoints, metrics, config')
  parser.add_argument('--no-progress', action='store_true')
  args, overrides = parser.parse_known_args(argv)
  cfg = _config_from_args(args, overrides)
  from lm import distributed  # pylint: disable=import-outside-toplevel
  from lm.train import loop, runner  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(cfg.distributed)
  summary = runner.train(cfg, args.workdir, progress=not args.no_progress)
  loss = f', loss {summary["loss"]:.4f}' if 'loss' in summary else ''
  held_out = loop.held_out_line(cfg, summary, summary['unigram_perplexity'], final=True)
  print(f'done: step {summary["step"]}{loss}, {held_out}; run directory {args.workdir}')
  return 0


def cmd_bench(argv):
  parser = _Parser(prog='lm bench', allow_abbrev=False)
  parser.add_argument('what', nargs='?', default='train',
                      help='train (default) | finetune | attention | decode | rollout | checkpoint | data | gpu | moe | hybrid')
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
  if args.what == 'gpu':  # the GPU suite: attention implementations and the 1B step, JSON + markdown
    from lm.bench import gpu_suite  # pylint: disable=import-outside-toplevel
    return gpu_suite.main([a for a in argv if a != 'gpu'])
  if args.what == 'attention':
    from lm.bench import attention as attention_bench  # pylint: disable=import-outside-toplevel
    return attention_bench.main(overrides)
  if args.what == 'moe':
    from lm.bench import moe as moe_bench  # pylint: disable=import-outside-toplevel
    return moe_bench.main([a for a in argv if a != 'moe'])
  if args.what == 'hybrid':  # a gated-DeltaNet layer beside an attention layer, 2k-32k tokens
    from lm.bench import hybrid as hybrid_bench  # pylint: disable=import-outside-toplevel
    return hybrid_bench.main([a for a in argv if a != 'hybrid'])
  if args.what == 'rollout':  # the rollout engine beside the batch generator and HF generate
    from lm.bench import rollout as rollout_bench  # pylint: disable=import-outside-toplevel
    return rollout_bench.main([a for a in argv if a != 'rollout'])
  if args.what == 'decode':  # KV-cache decoding tokens/s; --model: beside HF generate (lm/bench/decode.py)
    from lm.bench import decode as decode_bench  # pylint: disable=import-outside-toplevel
    return decode_bench.main([a for a in argv if a != 'decode'])
  if args.what not in ('train', 'checkpoint'):
    raise UserError(f'lm bench: unknown benchmark {args.what!r}; '
                    'choose train, finetune, attention, decode, rollout, checkpoint, data, gpu, moe or hybrid')
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
  if args.config:  # evaluation settings, not a training config: no training schema
    cfg = config_lib.load_config(args.config, overrides, schema=False)
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
  # Everything the command line can get wrong, before the model is loaded.
  sampling = generate.Sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
  if args.batch_size < 1:
    raise UserError(f'--batch-size {args.batch_size} must be at least 1')
  if args.out:
    _check_output_file(args.out, '--out')
    from lm.io import output  # pylint: disable=import-outside-toplevel
    output.check(args.out, '--out', [evaluate.parse_run(args.run)[1]], kind='lm generate output',
                 folder=False)
  prompts = list(args.prompt)
  if args.prompts_file:
    prompts += generate.read_prompts(args.prompts_file)
  model = evaluate.load_model(args.run)
  if args.chat:
    template = model.cfg.data.get('chat_template') or 'auto'
    run = lambda prompts: model.generator.chat(prompts, sampling, template=template,
                                               system=args.system, seed=args.seed,
                                               batch_size=args.batch_size)
  else:
    run = lambda prompts: model.generator.generate(prompts, sampling, stop=args.stop, seed=args.seed,
                                                   batch_size=args.batch_size)
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
    from lm.io import output  # pylint: disable=import-outside-toplevel
    with output.file(args.out, '--out', [evaluate.parse_run(args.run)[1]],
                     kind='lm generate output') as partial:
      with open(partial, 'w', encoding='utf-8') as f:
        for p, c in zip(prompts, completions):
          f.write(json.dumps({'prompt': p, 'completion': c}) + '\n')
    print(f'wrote {len(prompts)} completions to {args.out}')
  else:
    for p, c in zip(prompts, completions):
      print(f'> {p}\n{c}\n' if args.chat else f'{p}{c}\n')
  return 0


def _check_output_file(path: str, flag: str) -> None:
  """A file we may (over)write: not a directory, in a directory that exists."""
  import os  # pylint: disable=import-outside-toplevel
  if os.path.isdir(path):
    raise UserError(f'{flag} {path} is a directory; name a file to write, e.g. {path}/out.jsonl')
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise UserError(f'{flag} {path}: directory {parent} does not exist; create it first')


def _check_output_dir(path: str, flag: str) -> None:
  import os  # pylint: disable=import-outside-toplevel
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{flag} {path} exists and is not a directory; name a directory to write into')


def cmd_eval(argv):
  parser = _Parser(prog='lm eval', allow_abbrev=False)
  parser.add_argument('runs', nargs='*', help='[NAME=]RUN_DIR[@STEP]; or set runs in --config')
  parser.add_argument('--config', help='an eval config (configs/eval/default.py[:arg])')
  parser.add_argument('--tasks', help='comma-separated built-in tasks (lm/eval/task_files) or '
                      'task files (docs/evaluation.md)')
  parser.add_argument('--harness', help='comma-separated lm-eval-harness tasks or harness task '
                      'YAML files (needs pip install lm[eval])')
  parser.add_argument('--out', required=True, help='directory for results.json and results.md')
  parser.add_argument('--no-progress', action='store_true', help='no progress bars on stderr')
  args, overrides = parser.parse_known_args(argv)
  _check_output_dir(args.out, '--out')
  cfg, settings = _eval_settings(args, overrides)
  runs = args.runs or [r for r in cfg.get('runs', '').split(',') if r]
  if not runs:
    raise UserError('lm eval: name at least one run directory')
  from lm.eval import evaluate, tasks  # pylint: disable=import-outside-toplevel
  if args.harness:
    from lm.eval import harness  # pylint: disable=import-outside-toplevel
    names = tasks.parse_tasks(args.tasks) if args.tasks else []
    harness.evaluate_runs(runs, harness.parse_tasks(args.harness), settings, args.out,
                          lm_tasks=names, progress=not args.no_progress)
  else:
    names = tasks.parse_tasks(args.tasks or cfg.tasks)
    evaluate.evaluate_runs(runs, names, settings, args.out, progress=not args.no_progress)
  with open(f'{args.out}/results.md', encoding='utf-8') as f:
    print(f.read())
  return 0


def cmd_compare(argv):
  parser = _Parser(prog='lm compare', allow_abbrev=False)
  parser.add_argument('--base', required=True,
                      help='[NAME=]RUN_DIR[@STEP] of the base model, or a Hugging Face directory '
                           'or GGUF file (or a directory holding one)')
  parser.add_argument('--finetuned', nargs='+', required=True, help='[NAME=]RUN_DIR[@STEP] ...')
  parser.add_argument('--out', required=True)
  parser.add_argument('--tasks', default='gsm8k,gsm8k_nll,gsm8k_choice')
  parser.add_argument('--general', default='wiki_ppl,heldout_ppl',
                      help='general-ability tasks, run before and after (forgetting)')
  parser.add_argument('--shots', type=int, default=2, help='exemplars for the prompted base')
  parser.add_argument('--limit', type=int, help='examples per task (the config\'s limit setting)')
  parser.add_argument('--base-pretraining-tokens', type=float,
                      help='tokens the base was pretrained on (e.g. 2e12): the compute table '
                           'shows 6 x parameters x tokens beside each fine-tune')
  parser.add_argument('--config', help='an eval config for the settings (limit, max_new_tokens...)')
  parser.add_argument('--no-progress', action='store_true', help='no progress bars on stderr')
  args, overrides = parser.parse_known_args(argv)
  _check_output_dir(args.out, '--out')
  _, settings = _eval_settings(args, overrides)
  if args.limit is not None:
    import dataclasses  # pylint: disable=import-outside-toplevel
    settings = dataclasses.replace(settings, limit=args.limit)
  from lm.eval import compare, tasks  # pylint: disable=import-outside-toplevel
  compare.compare(args.base, args.finetuned, args.out, task_names=tasks.parse_tasks(args.tasks),
                  general=tasks.parse_tasks(args.general), shots=args.shots, settings=settings,
                  progress=not args.no_progress,
                  base_pretraining_tokens=args.base_pretraining_tokens)
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
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  from lm.data import show  # pylint: disable=import-outside-toplevel
  from lm.io import pretrained  # pylint: disable=import-outside-toplevel
  # As `lm train` does: train.init_from sets the model's shape and, unless data.tokenizer is set,
  # the tokenizer, so the examples, truncation and held-out counts shown are training's own.
  pretrained.resolve_config(cfg)
  config_lib.validate(cfg)
  show.show(cfg, workdir=args.workdir, examples=args.examples, batches=args.batches)
  return 0


def cmd_plan(argv):
  parser = _Parser(prog='lm plan', allow_abbrev=False)
  parser.add_argument('--config', required=True, help='configs/NAME.py[:arg]')
  parser.add_argument('--target', required=True, help='v5p-8, v6e-8, v5e-16, v4-8, h100x8, h200x8, 2xv5p-8, ...')
  parser.add_argument('--model-preset', help='model shape from lm.config.MODEL_PRESETS, e.g. 8b')
  parser.add_argument('--mfu', type=float, default=0.4, help='for the step time and tokens/s')
  parser.add_argument('--search', action='store_true', help='largest batch per remat policy')
  args, overrides = parser.parse_known_args(argv)
  # The target's compiler is loaded on its own (the CUDA plugin too, which `import lm` keeps
  # unloaded on a CPU host); this host's accelerators are not needed.
  import os  # pylint: disable=import-outside-toplevel
  from lm import platforms  # pylint: disable=import-outside-toplevel
  platforms.load_compilers()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  cfg = _config_from_args(args, overrides, args.model_preset)
  from lm.bench import plan  # pylint: disable=import-outside-toplevel
  result = plan.plan(cfg, args.target, mfu=args.mfu, search=args.search)
  if not args.search:
    plan.fit_or_raise(result)
  return 0


COMMANDS = {
    'train': cmd_train,
    'bench': cmd_bench,
    'export': cmd_export,
    'data': cmd_data,
    'plan': cmd_plan,
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
  except OSError as e:  # the file system said no: missing, permission, disk full, read-only
    print(f'lm: error: {os_error_line(e)}', file=sys.stderr)
    return EXIT_USER_ERROR
  except KeyboardInterrupt:
    print('lm: interrupted', file=sys.stderr)
    return 130
  except Exception as e:  # pylint: disable=broad-except
    print(f'lm: internal error: {type(e).__name__}: {_first_line(e)} (full traceback in '
          f'{_write_traceback(argv)}; please report it)', file=sys.stderr)
    return EXIT_BUG


def os_error_line(e: OSError) -> str:
  """One line for a file-system failure, with what to do about the common ones."""
  import errno  # pylint: disable=import-outside-toplevel
  where = ''.join(f': {f}' for f in (e.filename, e.filename2) if f)  # a failed write names none
  hint = {errno.ENOSPC: 'free some space or write elsewhere',
          errno.EDQUOT: 'free some space or write elsewhere',
          errno.EACCES: 'check its permissions', errno.EPERM: 'check its permissions',
          errno.EROFS: 'the file system is read-only; write elsewhere',
          errno.ENOENT: 'check the path'}.get(e.errno, 'check the path and the file system')
  return f'{e.strerror or type(e).__name__}{where}; {hint}'


def _first_line(e: Exception) -> str:
  return ((str(e).strip().splitlines() or [''])[0])[:200]


def _write_traceback(argv) -> str:
  """The full traceback of the exception being handled, in a file; its path."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import traceback  # pylint: disable=import-outside-toplevel
  fd, path = tempfile.mkstemp(prefix='lm-traceback-', suffix='.txt')
  with open(fd, 'w', encoding='utf-8') as f:
    f.write('lm ' + ' '.join(argv) + '\n\n' + traceback.format_exc())
  return path


if __name__ == '__main__':
  sys.exit(main())
