"""The training loop: build everything from the config, run the one step, log, evaluate, checkpoint.

`Trainer` holds the pieces (mesh, spec, optimizer, jitted step) so research code can drive single
steps; `train(cfg, workdir)` is the whole run behind `lm train`. Running it again on a workdir that
holds a checkpoint resumes from it, including the data position.
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from lm import config as config_lib
from lm import flops as flops_lib
from lm import objectives, optim, partition
from lm import sharding as sharding_lib
from lm.checkpoint import Checkpointer
from lm.data import pipeline
from lm.metrics import MetricWriter
from lm.state import ModelSpec, train_state_factory
from lm.step import make_eval_step, make_train_step


class Trainer:
  """A model, its optimizer and its jitted step on a mesh, built from a config."""

  def __init__(self, cfg, *, objective=None, devices=None):
    config_lib.validate(cfg)
    self.cfg = cfg
    self.mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    rules = tuple(cfg.mesh.rules)
    sharding_lib.check_batch_divides(cfg.data.batch_size, cfg.train.microbatches, self.mesh, rules)
    self.spec = ModelSpec(cfg.model)
    self.labels = partition.labels(self.spec.names, cfg.train.trainable)
    self.tx, self.schedule = optim.make_optimizer(cfg.optimizer, self.labels, cfg.train.steps)
    self.init, self.abstract_state, self.shardings = train_state_factory(
        self.spec, self.tx, self.mesh, rules)
    self.batch_sharding = sharding_lib.batch_sharding(self.mesh, rules)
    self.objective = objective or objectives.next_token_xent
    self.step = jax.jit(
        make_train_step(self.spec, self.objective, self.tx, self.schedule, self.labels,
                        cfg.train.microbatches),
        in_shardings=(self.shardings, self.batch_sharding),
        out_shardings=(self.shardings, None), donate_argnums=0)
    self.eval_step = jax.jit(make_eval_step(self.spec, self.objective),
                             in_shardings=(self.shardings.params, self.batch_sharding))

  def init_state(self, seed: int | None = None):
    return self.init(jax.random.key(self.cfg.train.seed if seed is None else seed))

  def global_batch(self, local_batch: dict) -> dict:
    """This process's rows -> one global array per key, sharded along the data axes."""
    B = self.cfg.data.batch_size
    return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v),
                                                      (B, *v.shape[1:]))
            for k, v in local_batch.items()}

  def trainable_summary(self) -> str:
    sizes = {n: int(np.prod(s.shape)) for n, s in self.spec.shapes.items()}
    total = sum(sizes.values())
    trainable = sum(v for n, v in sizes.items() if self.labels[n] == partition.TRAINABLE)
    return f'{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)'

  def evaluate(self, params, rows: dict, max_batches: int) -> dict:
    """Mean weighted loss and perplexity over up to `max_batches` batches of `rows`."""
    loss_sum = weight_sum = 0.0
    for batch in eval_batches(rows, self.cfg.data.batch_size, max_batches,
                              jax.process_index(), jax.process_count()):
      out = self.eval_step(params, self.global_batch(batch))
      loss_sum += float(out['loss_sum'])
      weight_sum += float(out['weight_sum'])
    loss = loss_sum / max(weight_sum, 1.0)
    return {'eval_loss': loss, 'eval_perplexity': math.exp(min(loss, 50.0))}


def eval_batches(rows: dict, global_batch: int, max_batches: int, process_index=0, process_count=1):
  """Fixed-order batches; the last is padded with zero-weight rows so no held-out row is lost."""
  n = len(rows['tokens'])
  n_batches = min(max_batches, -(-n // global_batch))
  local = global_batch // process_count
  for b in range(n_batches):
    idx = np.arange(b * global_batch + process_index * local, b * global_batch + (process_index + 1) * local)
    valid = idx < n
    idx = np.where(valid, idx, 0)
    batch = {k: v[idx] for k, v in rows.items()}
    batch['weights'] = batch['weights'] * valid[:, None]
    yield batch


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    tqdm.write(msg)


def _evaluation_hooks(cfg, trainer, tokenizer):
  """(task evaluator or None, early stopping or None) from `train.eval_tasks` / `early_stopping_*`."""
  if not (cfg.train.eval_tasks or cfg.train.early_stopping_metric):
    return None, None
  from lm import evaluate  # pylint: disable=import-outside-toplevel
  stopper = (evaluate.EarlyStopping(cfg.train.early_stopping_metric,
                                    cfg.train.early_stopping_patience,
                                    cfg.train.early_stopping_min_delta)
             if cfg.train.early_stopping_metric else None)
  return evaluate.training_evaluator(cfg, trainer.spec, tokenizer, trainer.mesh), stopper


def train(cfg, workdir: str, *, progress: bool = True) -> dict:
  """Runs (or resumes) the configured training; returns the final metrics."""
  config_lib.validate(cfg)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  if is_main:
    tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  multihost_utils.sync_global_devices('tokenizer')
  tokenizer = pipeline.load_tokenizer(cfg.data, workdir)
  pipeline.check_vocab(tokenizer, cfg.model.vocab_size)
  corpus = pipeline.build_corpus(cfg.data, tokenizer)
  trainer = Trainer(cfg)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w', encoding='utf-8') as f:
      f.write(cfg.to_json_best_effort(indent=2))

  train_iter = pipeline.BatchIterator(corpus.train, cfg.data.batch_size, cfg.data.seed,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints)
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(trainer.abstract_state, trainer.shardings)
    train_iter.set_state(data_state)
    _log(f'resumed from {ckpt.directory} at step {int(state.step)}')
  else:
    state = trainer.init_state()

  T, B = cfg.data.seq_len, cfg.data.batch_size
  flops_per_token = flops_lib.train_flops_per_token(cfg.model, T)
  peak, peak_source = flops_lib.peak_flops_per_device(cfg.metrics.peak_flops_per_device)
  peak_total = peak * jax.device_count()
  unigram_ppl = pipeline.unigram_perplexity(corpus)
  _log(f'lm: {trainer.spec.param_count():,} parameters on mesh {dict(trainer.mesh.shape)}; '
       f'{trainer.trainable_summary()}')
  _log(f'{corpus.describe()}; vocab {tokenizer.vocab_size}; '
       f'unigram baseline perplexity {unigram_ppl:.2f}')
  _log(f'MFU against {peak / 1e12:.3g} TFLOP/s per device ({peak_source})')

  task_eval, stopper = _evaluation_hooks(cfg, trainer, tokenizer)
  writer = MetricWriter(workdir, tensorboard=cfg.metrics.tensorboard, enabled=is_main)
  start = int(state.step)
  total = cfg.train.steps
  bar = tqdm(total=total, initial=start, disable=not (progress and is_main), dynamic_ncols=True,
             desc='train')
  summary = {}
  # Throughput over the steps since the last log line (evaluation time excluded).
  pending, window_start, window_step = None, time.perf_counter(), start

  def report(step, metrics):
    nonlocal window_start, window_step
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if step % cfg.train.log_every == 0 or step == total:
      now = time.perf_counter()
      tokens_per_s = (step - window_step) * B * T / max(now - window_start, 1e-9)
      metrics.update(tokens_per_s=tokens_per_s,
                     mfu=tokens_per_s * flops_per_token / peak_total)
      metrics.update(train_iter.metrics())  # per-source tokens, skipped/truncated records
      window_start, window_step = now, step
      writer.write(step, metrics)
      bar.set_postfix(loss=f'{metrics["loss"]:.3f}', tok_s=f'{tokens_per_s:,.0f}',
                      mfu=f'{metrics["mfu"]:.1%}', refresh=False)
    summary.update(metrics)

  for step in range(start, total):
    batch = trainer.global_batch(next(train_iter))
    state, metrics = trainer.step(state, batch)
    # Fetch the previous step's metrics only after the next step is dispatched.
    if pending is not None:
      report(*pending)
    pending = (step + 1, metrics)
    bar.update(1)
    done = step + 1
    stop = False
    if done % cfg.train.eval_every == 0 or done == total:
      report(*pending)
      pending = None
      eval_metrics = trainer.evaluate(state.params, corpus.eval, cfg.train.eval_batches)
      if task_eval is not None:
        eval_metrics.update(task_eval(state.params))
      writer.write(done, eval_metrics)
      summary.update(eval_metrics)
      _log(f'step {done}: loss {summary["loss"]:.4f}, held-out perplexity '
           f'{eval_metrics["eval_perplexity"]:.2f} (unigram baseline {unigram_ppl:.2f})')
      window_start, window_step = time.perf_counter(), done
      stop = stopper is not None and stopper.update(done, eval_metrics)
    if done % cfg.train.checkpoint_every == 0 or done == total or stop:
      ckpt.save(done, state, train_iter.get_state())
    if stop:
      _log(f'early stopping at step {done}: {cfg.train.early_stopping_metric} has not improved '
           f'since step {stopper.best_step}')
      summary['early_stopped_at'] = done
      break
  if pending is not None:
    report(*pending)
  bar.close()
  train_iter.close()

  if start >= total:
    _log(f'already trained to step {start}; evaluating')
    summary.update(trainer.evaluate(state.params, corpus.eval, cfg.train.eval_batches))
  summary.update(unigram_perplexity=unigram_ppl, step=int(state.step))
  if stopper is not None:
    summary.update(stopper.summary())
  ckpt.close()
  writer.close()
  if is_main:
    with open(os.path.join(workdir, 'summary.json'), 'w', encoding='utf-8') as f:
      json.dump(summary, f, indent=2)
  return summary
