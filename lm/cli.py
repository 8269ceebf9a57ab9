"""`lm SUBCOMMAND ...`: the thin entry point. Each subcommand parses flags and calls the library."""

from __future__ import annotations

import argparse
import sys

from lm.errors import EXIT_USER_ERROR, RunStopped, UserError

USAGE = """usage: lm <command> [options]

commands:
  train     lm train --config configs/quickstart.py --workdir DIR [--config.a.b=value ...]
  bench     lm bench [train|finetune|attention] --config configs/bench_tiny.py [--steps N] [--no-hf]
  export    lm export --workdir RUN --out DIR [--adapters-only] [--dtype bfloat16]
  data      lm data show --config CONFIG [--workdir DIR] [--examples N] [--config.a.b=value ...]
  eval      (not built yet: evaluation arrives with the evaluation issue)
  generate  (not built yet: generation arrives with the evaluation issue)
"""


class _Parser(argparse.ArgumentParser):
  """argparse that raises UserError (one line) instead of printing usage and exiting."""

  def error(self, message):
    raise UserError(f'{self.prog}: {message}')


def _config_from_args(args, overrides):
  from lm import config as config_lib  # pylint: disable=import-outside-toplevel
  cfg = config_lib.load_config(args.config)
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
  from lm import distributed, train  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize(cfg.distributed)
  summary = train.train(cfg, args.workdir, progress=not args.no_progress)
  print(f'done: step {summary["step"]}, loss {summary.get("loss", float("nan")):.4f}, held-out '
        f'perplexity {summary["eval_perplexity"]:.2f} vs unigram baseline '
        f'{summary["unigram_perplexity"]:.2f}; run directory {args.workdir}')
  return 0


def cmd_bench(argv):
  parser = _Parser(prog='lm bench', allow_abbrev=False)
  parser.add_argument('what', nargs='?', default='train',
                      help='train (default) | attention | checkpoint (save/restore times)')
  parser.add_argument('--config', default='configs/bench_tiny.py')
  parser.add_argument('--model-preset', help='model shape from lm.config.MODEL_PRESETS, e.g. 125m')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--no-hf', action='store_true', help='skip the HF transformers comparison')
  args, overrides = parser.parse_known_args(argv)
  if args.what == 'finetune':
    from lm import bench_finetune  # pylint: disable=import-outside-toplevel
    return bench_finetune.main([a for a in argv if a != 'finetune'])
  if args.what == 'attention':
    from lm.kernels import bench as attention_bench  # pylint: disable=import-outside-toplevel
    return attention_bench.main(overrides)
  if args.what not in ('train', 'checkpoint'):
    raise UserError(f'lm bench: unknown benchmark {args.what!r}; '
                    'choose train, finetune, attention or checkpoint')
  cfg = _config_from_args(args, overrides)
  if args.model_preset:
    from lm import config as config_lib  # pylint: disable=import-outside-toplevel
    config_lib.model_config(args.model_preset)  # a clear error for an unknown name
    cfg.model.update(config_lib.MODEL_PRESETS[args.model_preset])
  if args.what == 'checkpoint':
    from lm import checkpoint_bench  # pylint: disable=import-outside-toplevel
    return checkpoint_bench.main(cfg)
  from lm import bench  # pylint: disable=import-outside-toplevel
  bench.run(cfg, steps=args.steps, compare_hf=not args.no_hf)
  return 0


def cmd_export(argv):
  parser = _Parser(prog='lm export', allow_abbrev=False)
  parser.add_argument('--workdir', required=True, help='an lm run directory')
  parser.add_argument('--out', required=True, help='the Hugging Face (or PEFT) directory to write')
  parser.add_argument('--adapters-only', action='store_true', help='write LoRA adapters for PEFT')
  parser.add_argument('--dtype', default='float32', help='float32 | bfloat16 | float16')
  args = parser.parse_args(argv)
  from lm import pretrained  # pylint: disable=import-outside-toplevel
  print(pretrained.export_run(args.workdir, args.out, adapters_only=args.adapters_only,
                              dtype=args.dtype))
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


def _not_built(what):
  def cmd(argv):
    del argv
    raise UserError(f'{what} is not built yet in this version of lm')
  return cmd


COMMANDS = {
    'train': cmd_train,
    'bench': cmd_bench,
    'export': cmd_export,
    'data': cmd_data,
    'eval': _not_built('lm eval (evaluation)'),
    'generate': _not_built('lm generate (sampling with a KV cache)'),
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
