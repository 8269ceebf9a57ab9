"""The catalogue of bad inputs (docs/bad_inputs.md): each gives one line saying what is wrong and
what to do, exits non-zero and leaves no partial output behind.

Cases run through `lm.cli.main` in this process (8 CPU devices), the same code `python -m lm`
runs; `test_the_real_command_exits_2` checks the process exit code itself.
"""

import errno
import json
import os
import re
import shutil
import subprocess

import jax
import pytest
from conftest import ROOT

import lm_runs
from lm import cli
from lm.io import hf
from lm.train import loop as train_lib
from lm.train import identity
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
    'config-int-truncated': (['--config.data.batch_size=2.5'], "--config.data.batch_size='2.5' is not a valid int"),
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
                         'model.moe.experts_per_token=5 exceeds model.moe.n_experts=4'),
    'config-moe-groups': (['--config.model.moe.n_experts=8', '--config.model.moe.router=sigmoid',
                           '--config.model.moe.n_group=4', '--config.model.moe.topk_group=1',
                           '--config.model.moe.experts_per_token=4'],
                          'topk_group=1 of 4 groups of 2 experts cannot hold experts_per_token=4'),
    'config-optimizer': (['--config.optimizer.name=adamx'], "optimizer.name='adamx'; choose"),
    'config-schedule': (['--config.optimizer.schedule=cosin'], "optimizer.schedule='cosin'; choose"),
    'config-unknown-partition': (['--config.train.trainable=most'], "train.trainable='most' is not a known partition"),
    'config-empty-partition': (['--config.train.trainable=regex:nothing'], 'selects no parameters'),
    'config-file-missing': (['--config', '{d}/missing.py'], 'missing.py\' not found'),
    'config-file-no-get-config': (['--config', '{d}/no_get_config.py'], 'defines no get_config'),
    'config-file-syntax-error': (['--config', '{d}/syntax_error.py'], 'failed to load: SyntaxError (line 2)'),
    'config-file-raises': (['--config', '{d}/raises.py:big'], "failed to load: ValueError: no variant 'big'"),
    'config-file-exits': (['--config', '{d}/exits.py'], 'called sys.exit(0) while loading'),
    'config-file-partial': (['--config', '{d}/partial.py'], 'the config lacks data.bad_records and'),
    # Config: the schema (lm/config.py SCHEMA and RULES), before anything is read or compiled.
    'schema-negative-lr': (['--config.optimizer.lr=-1'], 'optimizer.lr=-1.0 must be positive'),
    'schema-offload-unknown': (['--config.train.offload=disk'], "train.offload='disk'; choose device or host"),
    'schema-lr-not-finite': (['--config.optimizer.lr=1e400'], 'optimizer.lr=inf is not a finite number'),
    'schema-lr-nan': (['--config.optimizer.lr=nan'], 'optimizer.lr=nan is not a finite number'),
    'schema-negative-grad-clip': (['--config.optimizer.grad_clip=-1'], 'optimizer.grad_clip=-1.0 must not be negative'),
    'schema-end-lr-ratio': (['--config.optimizer.end_lr_ratio=-0.5'], 'optimizer.end_lr_ratio=-0.5 must be in [0, 1]'),
    'schema-b2-above-one': (['--config.optimizer.b2=1.5'], 'optimizer.b2=1.5 must be in [0, 1)'),
    'schema-negative-warmup': (['--config.optimizer.warmup_steps=-1'], 'optimizer.warmup_steps=-1 must not be negative'),
    'schema-eval-fraction': (['--config.data.eval_fraction=-0.1'], 'data.eval_fraction=-0.1 must be in [0, 1)'),
    'schema-negative-window': (['--config.model.sliding_window=-1'], 'model.sliding_window=-1 must not be negative'),
    'schema-zero-layers': (['--config.model.n_layers=0'], 'model.n_layers=0 must be at least 1'),
    'schema-layer-type-unknown': (["--config.model.layer_types=('mamba',)"], "model.layer_types entry 'mamba' is not supported; lm implements full, sliding, chunked, linear"),
    'schema-mlp-type-unknown': (["--config.model.mlp_types=('swiglu',)"], "model.mlp_types entry 'swiglu' is not supported; lm implements dense, moe"),
    'schema-norm-placement': (['--config.model.norm_placement=middle'], "model.norm_placement='middle'; choose pre, sandwich or post"),
    'schema-linear-layer-without-sizes': (["--config.model.layer_types=('linear',)"], "model.layer_types has 'linear' (gated DeltaNet) layers but model.linear_attn's head counts and dims are not all set"),
    'schema-zero-kv-heads': (['--config.model.n_kv_heads=0'], 'model.n_kv_heads=0 must be at least 1'),
    'schema-negative-head-dim': (['--config.model.head_dim=-8'], 'model.head_dim=-8 must not be negative'),
    'schema-zero-mesh-axis': (['--config.mesh.shape.fsdp=0'], 'mesh.shape.fsdp=0 must be at least 1 or -1'),
    'schema-compute-dtype': (['--config.model.compute_dtype=float8'], "model.compute_dtype='float8'; choose float32, bfloat16 or float16"),
    'schema-attention': (['--config.model.attention=flash'], "model.attention='flash'; choose auto, xla, cudnn or pallas"),
    'schema-objective': (['--config.train.objective=ppo'], "train.objective='ppo'; choose next_token_xent, dpo, ipo, simpo, orpo, kto, distill or grpo"),
    'schema-data-format': (['--config.data.format=csv'], "data.format='csv'; choose text, alpaca, chat, preference or kto"),
    'schema-lora-targets-regex': (['--config.model.lora.targets=(attn'], "model.lora.targets='(attn' is not a valid regex"),
    'schema-mesh-rule-axis': (["--config.mesh.rules=(('batch', 'pipeline'),)"], "mesh.rules maps 'batch' to mesh axis 'pipeline'"),
    'schema-resume-changes': (['--config.train.resume_changes=weights'], "'weights' is not a part of a run's identity"),
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
    'data-chat-roles-out-of-order': (['--config.data.format=chat', '--config.data.train_files={d}/roles.jsonl'],
                                     'roles.jsonl:2: message 1 is user after user; a conversation is an optional system message'),
    'data-lone-surrogate': (['--config.data.train_files={d}/surrogate.jsonl'],
                            'surrogate.jsonl:2: the text holds a lone surrogate U+D800 at character 4'),
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
    # Post-training objectives (docs/posttraining.md): refused before any data is read or compiled.
    'posttrain-objective-vs-data': (['--config.train.objective=simpo'],
                                    'reads chosen/rejected pairs; set --config.data.format=preference'),
    'posttrain-kto-one-label': (['--config.train.objective=kto', '--config.data.format=kto',
                                 '--config.data.train_files={d}/kto_desirable.jsonl'],
                                'every KTO example is desirable (label true); KTO needs undesirable examples too'),
    'posttrain-pair-identical': (['--config.train.objective=dpo', '--config.data.format=preference',
                                  '--config.data.train_files={d}/same_pair.jsonl'],
                                 'same_pair.jsonl:2: chosen and rejected replies are the same text'),
    'posttrain-kto-without-labels': (['--config.train.objective=kto', '--config.data.format=kto',
                                      '--config.data.train_files={d}/body.jsonl'],
                                     'KTO examples need a label'),
    'posttrain-teacher-vocabulary': (['--config.train.objective=distill', '--config.distill.teacher={d}/hf',
                                      '--config.model.vocab_size=1024'],
                                     'has a vocabulary of 512 tokens but the student has 1024'),
    'posttrain-reward-unresolved': (['--config.train.objective=grpo',
                                     '--config.grpo.rewards=lm.eval.rewards.exact_answer'],
                                    "'lm.eval.rewards.exact_answer' does not name a function"),
    'posttrain-environment-unresolved': (['--config.train.objective=grpo',
                                          '--config.grpo.environment=lm.eval.environments.Nope'],
                                         "grpo.environment='lm.eval.environments.Nope' does not name a class"),
    'posttrain-on-policy-distill-no-teacher': (['--config.train.objective=grpo',
                                                '--config.grpo.rewards=lm.eval.rewards.brevity',
                                                '--config.grpo.teacher_coef=1'],
                                               'is on-policy distillation and needs a teacher'),
    'posttrain-quantized-base-trains': (['--config.model.quant.type=nf4'],
                                        'stores the base weights quantized and frozen'),
    # Starting weights (train.init_from) and exports.
    'init-from-missing': (['--config.train.init_from=/nonexistent/run'],
                          "train.init_from='/nonexistent/run' does not exist"),
    'init-from-neither': (['--config.train.init_from={d}'], 'is neither an lm run directory'),
    'hf-tensors-missing': (['--config.train.init_from={d}/hf'], "tensor 'model.norm.weight' is missing"),
    'hf-truncated-safetensors': (['--config.train.init_from={d}/hf_truncated'], 'model.safetensors is truncated'),
    'hf-config-missing-keys': (['lm', 'generate', '{d}/hf_no_hidden_size', '--prompt', 'x'],
                               "config.json lacks a positive integer 'hidden_size'"),
    'hf-config-invalid-value': (['lm', 'generate', '{d}/hf_negative_rope', '--prompt', 'x'],
                                "config.json does not describe a valid model (model.rope_theta=-1.0 must be positive)"),
    'hf-config-wrong-type': (['--config.train.init_from={d}/hf_eps_text'],
                             "its config has a value of the wrong type (could not convert string to float: 'x')"),
    'hf-config-broken-json': (['--config.train.init_from={d}/hf_broken_json'], 'config.json is not valid JSON'),
    # Resuming a run as something else (identity.json), and writers.
    'resume-other-data': (['--config.data.train_files={d}/docs_copy.jsonl'], 'was trained with another data (data.train_files'),
    'resume-other-partition': (['--config.train.trainable=norms'], "was trained with another partition (partition.trainable: 'all' there, 'norms' now)"),
    'workdir-locked': ([], 'is being written by another lm train (pid'),
    'workdir-metrics-symlink-out': ([], "'metrics.jsonl' leads outside the run directory"),
    # Hugging Face datasets (hf:FOLDER): what is not a dataset, never runs, or lacks the field.
    'hf-not-a-dataset': (['--config.data.train_files=hf:{d}/hf_ds_not'], 'is not a dataset folder'),
    'hf-dataset-script': (['--config.data.train_files=hf:{d}/hf_ds_script'],
                          'holds a dataset loading script (hf_ds_script.py); lm never runs dataset scripts'),
    'hf-missing-field': (['--config.data.train_files=hf:{d}/hf_ds_body'],
                         "hf_ds_body[0]: no string field 'text' (has ['body'])"),
    'hf-stream-not-streamable': (['--config.data.train_files=builtin:python-docs', '--config.data.streaming=true'],
                                 'data.streaming=true applies to hf: datasets and local data files; builtin: sources are read with random access'),
    # Experiment trackers (lm/train/trackers.py): before training, or when one fails to start.
    'tracker-unknown': (['--config.train.trackers=tensorboard,wandbb'],
                        "train.trackers: unknown tracker 'wandbb'; choose from tensorboard, wandb, trackio"),
    'tracker-fails-to-start': (['--config.train.trackers=wandb'],
                               'train.trackers: wandb failed to start (UsageError: No API key '
                               'configured. Use `wandb login` to log in.); fix it, or set '
                               'train.tracker_errors=warn to train without it'),
    # Readers of a run: lm generate, lm eval, lm export.
    'run-config-broken': (['lm', 'generate', '{run}', '--prompt', 'x'], 'config.json is not valid JSON (line 1'),
    'run-without-tokenizer': (['lm', 'generate', '{run}', '--prompt', 'x'], 'has no tokenizer.model and its config names no data.tokenizer'),
    'run-all-checkpoints-unreadable': (['lm', 'eval', '{run}', '--tasks', 'heldout_ppl', '--out', '{d}/eval_out'],
                                       'no readable checkpoint in'),
    'generate-top-k-above-vocab': (['lm', 'generate', '{run}', '--prompt', 'x', '--top-k', '100000'],
                                   'top_k=100000 exceeds the vocabulary (512 tokens)'),
    'generate-temperature-nan': (['lm', 'generate', '{run}', '--prompt', 'x', '--temperature', 'nan'],
                                 'need a finite temperature >= 0'),
    'generate-out-is-a-directory': (['lm', 'generate', '{run}', '--prompt', 'x', '--out', '{d}'], 'is a directory; name a file'),
    'generate-prompt-not-utf8': (['lm', 'generate', '{run}', '--prompt', 'caf\udce9'],
                                 "holds a lone surrogate U+DCE9 at character 3, which is not Unicode text"),
    'generate-prompts-file-missing': (['lm', 'generate', '{run}', '--prompts-file', '{d}/nope.txt'], 'prompts file'),
    'generate-prompts-file-malformed': (['lm', 'generate', '{run}', '--prompts-file', '{d}/malformed.jsonl'],
                                        'malformed.jsonl:1: expected an object with a string "prompt" field'),
    'export-int8': (['lm', 'export', '--workdir', '{run}', '--out', '{d}/export_out', '--dtype', 'int8'],
                    'export writes floating-point weights'),
    'export-out-is-a-file': (['lm', 'export', '--workdir', '{run}', '--out', '{d}/empty.txt'], 'exists and is not a directory'),
    'eval-out-is-a-file': (['lm', 'eval', '{run}', '--tasks', 'heldout_ppl', '--out', '{d}/empty.txt'],
                           'exists and is not a directory'),
    'export-not-a-run': (['lm', 'export', '--workdir', '{d}', '--out', '{run}'],
                         'is neither an lm run directory'),
    'export-out-is-the-run': (['lm', 'export', '--workdir', '{run}', '--out', '{run}'],
                              'is the input this command reads; write to a new path'),
    'export-out-inside-the-run': (['lm', 'export', '--workdir', '{run}', '--out', '{run}/checkpoints'],
                                  'which this command reads; write outside it'),
    'export-out-other-files': (['lm', 'export', '--workdir', '{run}', '--out', '{d}/hf'],
                               'is a folder of other files (not an earlier HF export of'),
    'export-gguf-inside-the-run': (['lm', 'export', '--workdir', '{run}', '--out', '{run}/model.gguf',
                                    '--format', 'gguf'], 'which this command reads; write outside it'),
    'eval-out-is-the-run': (['lm', 'eval', '{run}', '--tasks', 'heldout_ppl', '--out', '{run}'],
                            'is the input this command reads; write to a new path'),
    'generate-out-inside-the-run': (['lm', 'generate', '{run}', '--prompt', 'x', '--out', '{run}/config.json'],
                                    'which this command reads; write outside it'),
    # Task files are data: sandboxed templates, a schema, selections that mean what they say.
    'task-template-runs-code': (['lm', 'eval', '{run}', '--tasks', '{d}/task_evil.yaml', '--out', '{d}/eval_out'],
                                'reaches outside the record (access to attribute'),
    'task-negative-limit': (['lm', 'eval', '{run}', '--tasks', '{d}/task_neg_limit.yaml', '--out', '{d}/eval_out'],
                            'limit is -1; it must be >= 0 (0: no cap)'),
    'task-python-data': (['lm', 'eval', '{run}', '--tasks', '{d}/task_python.yaml', '--out', '{d}/eval_out'],
                         'would run Python code, and task files are data'),
    'task-rows-select-none': (['lm', 'eval', '{run}', '--tasks', '{d}/task_rows_none.yaml', '--out', '{d}/eval_out'],
                              "rows '1:1' selects none of the 2 records of task.jsonl"),
    'task-shots-exceed-fewshot': (['lm', 'eval', '{run}', '--tasks', '{d}/task_shots.yaml', '--out', '{d}/eval_out'],
                                  '3 shots asked for but the fewshot data task.jsonl holds 2 records'),
    'task-lone-surrogate': (['lm', 'eval', '{run}', '--tasks', '{d}/task_surrogate.yaml', '--out', '{d}/eval_out'],
                            'task_surrogate.jsonl:2: the text holds a lone surrogate U+D800 at character 2'),
    'eval-negative-limit': (['lm', 'eval', '{run}', '--tasks', 'heldout_ppl', '--out', '{d}/eval_out',
                             '--config.limit=-1'], 'limit=-1: give a whole number >= 0'),
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
    # W&B online with no API key (and no network in CI): wandb.init refuses to start.
    'tracker-fails-to-start': {'WANDB_MODE': 'online', 'WANDB_API_KEY': '', 'WANDB_CONSOLE': 'off'},
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

# Cases whose run directory is a whole run (checkpoint, config.json, identity.json), then changed.
COMPLETE_RUN = {
    'resume-other-data': None, 'resume-other-partition': None, 'workdir-locked': 'locked',
    'workdir-metrics-symlink-out': 'metrics-symlink', 'run-config-broken': 'config-broken',
    'run-without-tokenizer': 'no-tokenizer', 'run-all-checkpoints-unreadable': 'damage',
    'generate-top-k-above-vocab': None, 'generate-out-is-a-directory': None,
    'generate-prompts-file-missing': None, 'generate-prompts-file-malformed': None,
    'export-int8': None, 'export-out-is-a-file': None, 'eval-out-is-a-file': None,
    'generate-prompt-not-utf8': None,
    'export-out-is-the-run': None, 'export-out-inside-the-run': None, 'export-out-other-files': None,
    'export-gguf-inside-the-run': None, 'eval-out-is-the-run': None, 'generate-out-inside-the-run': None,
    'task-template-runs-code': None, 'task-rows-select-none': None, 'task-shots-exceed-fewshot': None,
    'task-lone-surrogate': None,
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
    'exits.py': b'import sys\nsys.exit(0)\n',
    'partial.py': (b'import ml_collections\ndef get_config(arg=None):\n'
                   b"  return ml_collections.ConfigDict({'train': {'steps': 3}})\n"),
    'outside.jsonl': b'',
    'kto_desirable.jsonl': b''.join(b'{"prompt": "q%d", "completion": "a%d", "label": true}\n' % (i, i)
                                    for i in range(8)),
    'same_pair.jsonl': (b'{"prompt": "q", "chosen": "yes", "rejected": "no"}\n'
                        b'{"prompt": "q", "chosen": "same", "rejected": "same "}\n'),
    'roles.jsonl': (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
                    b'{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, '
                    b'{"role": "assistant", "content": "c"}]}\n'),
    'surrogate.jsonl': b'{"text": "fine"}\n{"text": "bad \\ud800 text"}\n',
    'task.jsonl': b'{"q": "1+1", "a": "2"}\n{"q": "2+2", "a": "4"}\n',
    'task_evil.yaml': (b'kind: perplexity\ndata: task.jsonl\ntarget: a\n'
                       b'prompt: "{{ cycler.__init__.__globals__.os.popen(\'id\').read() }}"\n'),
    'task_neg_limit.yaml': b'kind: perplexity\ndata: task.jsonl\nlimit: -1\n',
    'task_python.yaml': b'kind: perplexity\ndata: "python:os:getcwd"\n',
    'task_surrogate.jsonl': b'{"q": "1+1", "a": "2"}\n{"q": "2+\\ud800", "a": "4"}\n',
    'task_surrogate.yaml': b'kind: perplexity\ndata: task_surrogate.jsonl\ntarget: a\nprompt: q\n',
    'task_rows_none.yaml': b'kind: perplexity\ndata: task.jsonl\nrows: "1:1"\n',
    'task_shots.yaml': (b'kind: generate\ndata: task.jsonl\nprompt: q\ntarget: a\n'
                        b'fewshot: task.jsonl\nshots: 3\n'),
}


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  d = tmp_path_factory.mktemp('inputs')
  for name, content in FILES.items():
    (d / name).write_bytes(content)
  corpus = lm_runs.write_corpus(str(d / 'docs.jsonl'))
  data_args = [f'--config.data.train_files={corpus}']
  shutil.copyfile(corpus, d / 'docs_copy.jsonl')
  tokenizer = pipeline.load_tokenizer(lm_runs.tiny_config(*data_args).data, str(d / 'tok'))
  _hf_directories(d)
  _hf_datasets(d)
  return d, [*data_args, f'--config.data.tokenizer={tokenizer.path}']


def _hf_directories(d) -> None:
  """Hugging Face model directories of the tiny model: hf/ without one tensor, hf_truncated/ with
  its safetensors cut short, hf_no_hidden_size/ and hf_broken_json/ with a damaged config.json."""
  from safetensors.numpy import load_file, save_file  # pylint: disable=import-outside-toplevel
  cfg = lm_runs.tiny_config()
  whole = str(d / 'hf')
  hf.save(whole, train_lib.Trainer(cfg, devices=jax.devices()[:1]).init_state().params, cfg.model)
  for name in ('hf_truncated', 'hf_no_hidden_size', 'hf_broken_json', 'hf_negative_rope',
               'hf_eps_text'):
    shutil.copytree(whole, d / name)
  file = os.path.join(whole, 'model.safetensors')
  tensors = load_file(file)
  del tensors['model.norm.weight']
  save_file(tensors, file, metadata={'format': 'pt'})
  truncated = d / 'hf_truncated' / 'model.safetensors'
  truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
  config = json.loads((d / 'hf_no_hidden_size' / 'config.json').read_text())
  del config['hidden_size']
  (d / 'hf_no_hidden_size' / 'config.json').write_text(json.dumps(config))
  (d / 'hf_broken_json' / 'config.json').write_text('{"model_type": "llama",')
  for name, change in (('hf_negative_rope', {'rope_theta': -1.0}), ('hf_eps_text', {'rms_norm_eps': 'x'})):
    config = json.loads((d / name / 'config.json').read_text())
    (d / name / 'config.json').write_text(json.dumps({**config, **change}))


def _hf_datasets(d) -> None:
  """hf_ds_body/: a save_to_disk folder whose text is in 'body'; hf_ds_not/: a folder of notes;
  hf_ds_script/: a folder with a dataset loading script."""
  import datasets  # pylint: disable=import-outside-toplevel
  datasets.Dataset.from_dict({'body': ['a document'] * 4}).save_to_disk(str(d / 'hf_ds_body'))
  (d / 'hf_ds_not').mkdir()
  (d / 'hf_ds_not' / 'notes.txt').write_text('not a dataset')
  (d / 'hf_ds_script').mkdir()
  (d / 'hf_ds_script' / 'hf_ds_script.py').write_text('raise SystemExit("the script ran")\n')


def _make_complete_run(workdir, args, change, d):
  """A run as `lm train` leaves it (a checkpoint, config.json, identity.json), then `change`d."""
  args = [*args, '--config.data.batch_size=8', '--config.mesh.shape.data=-1']  # as test_bad_input runs
  _make_existing_run(workdir, args, 'damage' if change == 'damage' else None)
  cfg = lm_runs.tiny_config(*args)
  if change == 'no-tokenizer':
    cfg.data.tokenizer = None
  (workdir / 'config.json').write_text('{"model": ' if change == 'config-broken' else
                                       cfg.to_json_best_effort(indent=2))
  if cfg.data.tokenizer:
    identity.record(str(workdir), identity.of(cfg, pipeline.load_tokenizer(cfg.data, str(workdir))))
  if change == 'metrics-symlink':
    os.symlink(d / 'outside.jsonl', workdir / 'metrics.jsonl')


def _hold_lock(workdir) -> subprocess.Popen:
  """Another process holding the run's writer lock, as a running `lm train` does."""
  code = ('import sys, time; from lm.train import rundir\n'
          'with rundir.single_writer(sys.argv[1]):\n  print("locked", flush=True); time.sleep(600)')
  holder = subprocess.Popen([lm_runs.PYTHON, '-c', code, str(workdir)], cwd=ROOT,
                            env=lm_runs.env(''), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'locked'
  return holder


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
  if case in COMPLETE_RUN:
    _make_complete_run(run, base_args, COMPLETE_RUN[case], d)
  holder = _hold_lock(run) if COMPLETE_RUN.get(case) == 'locked' else None
  before = _tree(run) if run.exists() else None
  capfd.readouterr()

  try:
    code = cli.main(argv)
  finally:
    if holder is not None:
      holder.kill()
      holder.wait()

  err = capfd.readouterr().err
  lines = [l for l in err.strip().splitlines() if not l.startswith('lm: warning:')]
  assert code == 2, err
  assert len(lines) == 1 and lines[0].startswith('lm: error: ') and message in lines[0], err
  print(f'{case}: {lines[0]}')
  if before is None:
    assert not run.exists(), os.listdir(run)
  elif case == 'workdir-locked':
    assert f'(pid {holder.pid} on ' in lines[0]
  elif case == 'checkpoint-all-unreadable':  # set aside for inspection, not deleted
    assert os.listdir(run / 'checkpoints') == [] and len(os.listdir(run / UNREADABLE)) == 1
  else:
    assert _tree(run) == before
  for path in (d / 'empty.txt', d / 'outside.jsonl'):  # nor may anything be written out of place
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


def test_an_unexpected_exception_is_one_line_naming_its_traceback_file(monkeypatch, capfd):
  def broken_command(argv):
    raise RuntimeError('an internal fault\nwith a second line')
  monkeypatch.setitem(cli.COMMANDS, 'train', broken_command)
  assert cli.main(['train', '--x']) == 1
  lines = capfd.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      'lm: internal error: RuntimeError: an internal fault (full traceback in '), lines
  path = re.search(r'full traceback in (\S+);', lines[0]).group(1)
  with open(path, encoding='utf-8') as f:
    text = f.read()
  assert text.startswith('lm train --x\n') and 'Traceback' in text and 'broken_command' in text
  os.unlink(path)


@pytest.mark.parametrize('code, hint', [(errno.ENOSPC, 'free some space or write elsewhere'),
                                        (errno.EACCES, 'check its permissions'),
                                        (errno.EROFS, 'the file system is read-only; write elsewhere')])
def test_file_system_failures_are_one_line(monkeypatch, capfd, code, hint):
  def failing_command(argv):
    raise OSError(code, os.strerror(code), '/runs/x/metrics.jsonl')
  monkeypatch.setitem(cli.COMMANDS, 'train', failing_command)
  assert cli.main(['train']) == 2
  assert capfd.readouterr().err.strip() == (
      f'lm: error: {os.strerror(code)}: /runs/x/metrics.jsonl; {hint}')


def test_a_full_disk_is_one_line():
  """A real ENOSPC: /dev/full accepts the open and fails the write."""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full on this system')

  def write_to_full(argv):
    with open('/dev/full', 'w', encoding='utf-8') as f:
      f.write('x' * 65536)

  assert cli.os_error_line(_raised(write_to_full)) == (
      'No space left on device; free some space or write elsewhere')


def _raised(fn) -> OSError:
  try:
    fn([])
  except OSError as e:
    return e
  raise AssertionError('no OSError')
